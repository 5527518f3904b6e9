"""The trainer end to end: fake data into a temporary store, distillation, fine-tuning, resume
equivalence, time budgets, 2-process DDP (gloo), sha256 refusal and the Lite0 import.

Every run is tiny (fake data, 32x32, a few steps): behaviour, not accuracy or speed.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli.main import main as effnet
from store import CheckpointError, list_checkpoints, load_checkpoint, read_manifest, to_model_input
from tests.training.tiny import ROOT, TINY, tiny_cfg
from training import resolve_config
from training.train import main as train_main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny checkpoint trained through `effnet train` into a private store."""
    home = tmp_path_factory.mktemp("bentoml")
    old = os.environ.get("BENTOML_HOME")
    os.environ["BENTOML_HOME"] = str(home)
    try:
        assert effnet(["train", "--variant", "b0-compact", "--epochs", "2", "--eval-every", "1", *TINY]) == 0
        yield home
    finally:
        if old is None:
            os.environ.pop("BENTOML_HOME", None)
        else:
            os.environ["BENTOML_HOME"] = old


def test_fake_training_end_to_end_into_the_store(trained, capsys, monkeypatch):
    rows = list_checkpoints(trained)
    assert [r["tag"].split(":")[0] for r in rows] == ["compact-fake"]  # canonical name, alias resolved
    model, man = load_checkpoint("compact-fake:latest", home=trained)
    assert man.variant == "compact" and man.dataset == "fake" and man.classes == ["a", "b", "c", "d"]
    assert man.resolution == 32 and man.in_chans == 3 and man.params == sum(p.numel() for p in model.parameters())
    m = man.metrics
    assert 0 <= m["top1"] <= m["top5"] <= 1 and m["weights"] in ("model", "ema")
    assert set(m["per_class"]) == set(man.classes)
    # chosen on the 16 validation images held out of the 96 training ones; top1 is the test split's, once
    assert (m["chosen_on"], m["val_images"], m["val_seed"], m["val_from"]) == ("val", 16, 0, "train")
    assert m["weights"] == ("ema" if m["ema_top1"] >= m["model_top1"] else "model")
    assert m["val_top1"] == max(m["model_top1"], m["ema_top1"]) and m["test_images"] == 32
    # a temperature fitted on the validation split, with the calibration error before and after on both splits
    cal = m["score_temperature"]
    assert man.temperature == cal["temperature"] > 0 and cal["ece_val_after"] <= cal["ece_val_before"] + 1e-9
    assert {"ece_test_before", "ece_test_after"} <= set(cal)
    assert man.training["epochs"] == 2 and man.training["variant"] == "b0-compact" and man.training["seed"] == 0
    folder = Path(rows[0]["path"])
    log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and all("images_per_s" in r and "ema_val_top1" in r for r in log)
    assert (folder / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The stored weights reproduce the stored top-1 through the service's preprocessing.
    from training.data import load_data

    test = load_data(resolve_config({"data": "fake", "resolution": 32})).test
    x = torch.stack([test[i][0] for i in range(len(test))])
    y = torch.tensor([test[i][1] for i in range(len(test))])
    with torch.no_grad():
        acc = (model(to_model_input(x, man)).argmax(-1) == y).float().mean().item()
    assert acc == pytest.approx(m["top1"], abs=1e-6)
    # `effnet store --json` lists it with the agreed keys.
    monkeypatch.setenv("BENTOML_HOME", str(trained))
    capsys.readouterr()
    assert effnet(["store", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {"tag", "variant", "dataset", "top1", "params", "path"} <= set(listed[0])
    assert listed[0]["top1"] == m["top1"]


def test_skip_existing_does_not_train_again(trained, capsys, monkeypatch):
    monkeypatch.setenv("BENTOML_HOME", str(trained))
    assert effnet(["train", "--variant", "compact", "--skip-existing", *TINY]) == 0
    assert "skipped" in capsys.readouterr().out
    assert [r["tag"].split(":")[0] for r in list_checkpoints(trained)].count("compact-fake") == 1


def test_distillation_from_a_stored_teacher(trained, monkeypatch):
    monkeypatch.setenv("BENTOML_HOME", str(trained))
    assert effnet(["train", "--variant", "compact", "--teacher", "compact-fake:latest", "--name", "student-kd",
                   "--epochs", "1", "--kd-alpha", "0.7", "--run-dir", str(trained / "kd"), *TINY]) == 0
    man, _ = read_manifest("student-kd:latest", home=trained)
    assert man.training["teacher"] == "compact-fake:latest" and man.training["kd_alpha"] == 0.7


def test_modified_weights_are_refused(trained, tmp_path):
    _, folder = read_manifest("compact-fake:latest", home=trained)
    copy = tmp_path / "ckpt"
    shutil.copytree(folder, copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(copy)


@pytest.mark.parametrize("path", ["cpu", "fused-adamw", "device-data"])
def test_resume_after_epoch_1_matches_an_uninterrupted_run(tmp_path, bentoml_home, monkeypatch, path):
    from safetensors.torch import load_file

    # device-data: the GPU's data path (batches drawn and augmented by DeviceBatches), run on the CPU
    kw = dict(device_data="on", auto_augment="randaugment", random_erasing=0.5, augment_chunk=4) if path == "device-data" else {}
    if path == "fused-adamw":
        # What the trainer uses on CUDA, forced here on the CPU: its kernels pair a parameter with its
        # moments element by element in memory, so a resumed moment must keep the channels_last layout.
        class FusedAdamW(torch.optim.AdamW):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **{**kwargs, "fused": True})

        monkeypatch.setattr(torch.optim, "AdamW", FusedAdamW)

    # eval_every=0: only the final evaluation, the cheapest run that still crosses an epoch boundary.
    full = train_main(tiny_cfg(tmp_path / "full", eval_every=0, **kw), progress=False)
    stopped = train_main(tiny_cfg(tmp_path / "split", eval_every=0, stop_after_epoch=1, **kw), progress=False)
    assert stopped["tag"] is None and stopped["stopped_after_epoch"] == 1
    assert json.loads((tmp_path / "split" / "state.json").read_text())["epoch"] == 0
    resumed = train_main(tiny_cfg(tmp_path / "split", eval_every=0, **kw), resume=str(tmp_path / "split"), progress=False)
    a = load_file(str(tmp_path / "full" / "state.safetensors"))
    b = load_file(str(tmp_path / "split" / "state.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("optim.") for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    assert resumed["metrics"]["top1"] == full["metrics"]["top1"]
    assert resumed["tag"] != full["tag"] and len(list_checkpoints()) == 2
    # Resuming a finished run stores nothing while its checkpoint is there (an identical version each
    # time, before), and re-exports it unchanged once it is gone (e.g. after the store was wiped).
    again = train_main(tiny_cfg(tmp_path / "full", eval_every=0, **kw), resume=str(tmp_path / "full"), progress=False)
    assert again["already_finished"] and again["tag"] == full["tag"] and len(list_checkpoints()) == 2
    shutil.rmtree(read_manifest(full["tag"])[1])
    again = train_main(tiny_cfg(tmp_path / "full", eval_every=0, **kw), resume=str(tmp_path / "full"), progress=False)
    assert again["metrics"]["top1"] == full["metrics"]["top1"] and len(list_checkpoints()) == 2


def test_a_corrupted_training_state_is_refused(tmp_path, bentoml_home):
    train_main(tiny_cfg(tmp_path, eval_every=0, stop_after_epoch=1), progress=False)
    state = tmp_path / "state.safetensors"
    data = bytearray(state.read_bytes())
    data[-1] ^= 0xFF
    state.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="sha256"):
        train_main(tiny_cfg(tmp_path, epochs=2), resume=str(tmp_path), progress=False)


@pytest.mark.slow
@pytest.mark.server
def test_two_process_ddp_with_gloo_stays_in_sync(tmp_path, bentoml_home):
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home)}
    # 3 epochs asked within a budget nothing fits: both ranks must agree to stop after epoch 1 (a rank
    # that went on alone would hang in its next all-reduce)
    cmd = [sys.executable, "-m", "cli", "train", "--variant", "compact", "--nproc", "2", "--epochs", "3",
           "--time-budget", "1e-6", "--run-dir", str(tmp_path), *TINY, "--batch-size", "8"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = list_checkpoints(bentoml_home)
    assert len(rows) == 1, rows  # rank 0 alone saved
    man, _ = read_manifest(rows[0]["path"])
    assert man.metrics["world_size"] == 2 and man.metrics["ranks_in_sync"] is True
    assert man.training["global_batch"] == 16 and man.training["dist_backend"] == "auto"
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["step"] == 2  # 32 images / (2 ranks x 8)


def test_import_pretrained_lite0_classifies_coffee_as_espresso(bentoml_home, capsys):
    from skimage import data

    assert effnet(["import-pretrained", "lite0"]) == 0
    assert effnet(["import-pretrained", "lite0", "--skip-existing"]) == 0
    assert "skipped" in capsys.readouterr().out
    model, man = load_checkpoint("lite0-imagenet:latest")
    assert len(list_checkpoints()) == 1
    assert man.variant == "lite0" and man.num_classes == 1000 and len(man.classes) == 1000
    assert man.resolution == 224 and man.resize == 256 and man.mean == pytest.approx([0.498] * 3)
    photo = torch.from_numpy(data.coffee()).permute(2, 0, 1).contiguous()
    with torch.no_grad():
        p = model(to_model_input(photo, man)).softmax(-1)[0]
    assert man.classes[int(p.argmax())] == "espresso" and float(p.max()) > 0.5


def test_a_fraction_of_an_epoch_ends_the_last_pass_early(tmp_path, bentoml_home):
    # 2 steps per epoch (32 images / 16): 1.5 epochs is 3 steps, the last pass stopping after its first.
    result = train_main(tiny_cfg(tmp_path, epochs=1.5, eval_every=0), progress=False)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in log] == [(1, 2), (2, 3)]
    assert result["metrics"]["epochs"] == 1.5
    assert result["metrics"]["images_per_s"] is not None  # evaluated after the last pass, on the validation split:
    assert {"val_top1", "val_top5", "val_loss", "ema_val_top1"} <= set(log[-1]) and "test_top1" not in log[-1]
    with pytest.raises(ValueError, match="epochs must be above 0"):
        tiny_cfg(tmp_path, epochs=0)


def test_without_a_validation_split_the_choice_falls_to_the_test_split_and_says_so(tmp_path, bentoml_home):
    result = train_main(tiny_cfg(tmp_path, epochs=1, val_size=0), progress=False)
    m = result["metrics"]
    assert (m["chosen_on"], m["val_images"], m["val_top1"], m["score_temperature"]) == ("test", 0, None, None)
    assert m["top1"] == max(m["model_top1"], m["ema_top1"])  # the test figure chose: it is optimistic
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert {"test_top1", "ema_test_top1"} <= set(log[-1])


def test_init_from_a_checkpoint_keeps_its_layers_and_rebuilds_what_does_not_fit(bentoml_home):
    from models import create_model
    from store import load_checkpoint
    from tests.support.serving import make_checkpoint
    from training.finetune import init_from_checkpoint

    tag = make_checkpoint(bentoml_home, "compact-rgb", "compact", ["a", "b", "c", "d"], 32)
    source = load_checkpoint(tag)[0].state_dict()
    torch.manual_seed(1)
    gray = create_model("compact", num_classes=3, in_chans=1)  # other classes, one input channel
    fresh = {k: v.clone() for k, v in gray.state_dict().items()}
    out = init_from_checkpoint(gray, tag, "compact", ["x", "y", "z"])
    w = gray.state_dict()
    # an RGB stem seeing R = G = B computes the sum of its three channels' weights
    assert out["adapted"] == ["stem.conv.weight"]
    assert torch.allclose(w["stem.conv.weight"], source["stem.conv.weight"].sum(1, keepdim=True))
    assert set(out["reset"]) == {"classifier.weight", "classifier.bias"}  # other classes: a new head
    assert torch.equal(w["classifier.weight"], fresh["classifier.weight"])
    inner = [k for k in w if k.startswith("blocks.") and w[k].is_floating_point()]
    assert inner and all(torch.equal(w[k], source[k]) for k in inner)  # BN statistics included
    assert out["loaded"] == len(w) - 3
    # the same classes keep the head; another variant is refused
    same = create_model("compact", num_classes=4)
    assert init_from_checkpoint(same, tag, "compact", ["a", "b", "c", "d"])["reset"] == []
    assert torch.equal(same.state_dict()["classifier.weight"], source["classifier.weight"])
    with pytest.raises(ValueError, match="holds a 'compact' network, this run trains 'b0'"):
        init_from_checkpoint(create_model("b0", num_classes=4), tag, "b0", ["a", "b", "c", "d"])


def test_effnet_train_init_fine_tunes_a_stored_checkpoint_and_records_it(tmp_path, bentoml_home, capsys):
    from tests.support.serving import make_checkpoint

    tag = make_checkpoint(bentoml_home, "compact-start", "compact", ["p", "q"], 32)
    assert effnet(["train", "--variant", "compact", *TINY, "--epochs", "1", "--init", tag]) == 0
    out = capsys.readouterr().out
    assert f"initialised from {tag}" in out and "initialised afresh (classifier.weight, classifier.bias)" in out
    stored = [r for r in list_checkpoints(bentoml_home) if r["tag"].startswith("compact-fake:")]
    assert read_manifest(stored[0]["tag"])[0].training["init"] == tag  # the manifest says where it started
    assert effnet(["train", "--variant", "b0", *TINY, "--init", tag]) == 2  # refused before the data loads
    assert "holds a 'compact' network, this run trains 'b0'" in capsys.readouterr().err
    assert effnet(["train", "--variant", "compact", *TINY, "--init", "nothing-here:latest"]) == 2


def test_a_time_budget_cuts_the_schedule_to_the_epochs_that_fit(tmp_path, bentoml_home, capsys):
    # 3 epochs of 2 steps asked; a budget that nothing fits stops after the timed step of epoch 1 and the
    # manifest and training state record the 1 epoch that ran, not the 3 asked for
    out = train_main(tiny_cfg(tmp_path / "short", epochs=3, time_budget=1e-6), progress=False)
    man, _ = read_manifest(out["tag"])
    assert man.metrics["epochs"] == 1 and man.training["epochs"] == 1
    assert "time budget 1e-06 s" in capsys.readouterr().out
    assert json.loads((tmp_path / "short" / "state.json").read_text())["config"]["epochs"] == 1
    # a generous budget leaves the asked epochs alone; the plan is revised after each epoch that ends
    # in the warmup (4 steps here: once in epoch 1, after epoch 1, after epoch 2), never after it
    out = train_main(tiny_cfg(tmp_path / "long", epochs=3, warmup_epochs=2, time_budget=3600), progress=False)
    assert read_manifest(out["tag"])[0].metrics["epochs"] == 3
    assert capsys.readouterr().out.count("time budget 3600 s") == 3
    with pytest.raises(ValueError, match=r"--time-budget must be in \[0, 1e9\]"):
        tiny_cfg(tmp_path, time_budget=-1)


def test_device_data_is_used_with_cuda_or_when_asked(tmp_path, bentoml_home, capsys):
    from training.data import load_data
    from training.train import use_device_data

    cfg = tiny_cfg(tmp_path)
    data = load_data(cfg)
    assert not use_device_data(cfg, data, torch.device("cpu"))
    assert use_device_data(cfg, data, torch.device("cuda"))
    assert use_device_data(tiny_cfg(tmp_path, device_data="on"), data, torch.device("cpu"))
    assert not use_device_data(tiny_cfg(tmp_path, device_data="off"), data, torch.device("cuda"))
    with pytest.raises(ValueError, match="device_data"):
        tiny_cfg(tmp_path, device_data="gpu")
    # the whole path on this CPU: RandAugment per chunk, erasing, a checkpoint out
    out = train_main(tiny_cfg(tmp_path, device_data="on", auto_augment="randaugment", random_erasing=0.5,
                              augment_chunk=4, epochs=1), progress=False)
    assert out["tag"] and "batches augmented on cpu" in capsys.readouterr().out
