"""Training: fake data end to end into a temporary store, resume equivalence, 2-process DDP (gloo),
sha256 refusal, the Lite0 import, and the pure pieces (config precedence, LR schedule, augmentation).

Every run is tiny (fake data, 32x32, a few steps): behaviour, not accuracy or speed.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli.main import main as effnet
from store import CheckpointError, list_checkpoints, load_checkpoint, read_manifest, to_model_input
from training import TrainConfig, resolve_config
from training.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
# The smallest run that still exercises every part: 2 steps of 16 images per epoch.
TINY = ["--data", "fake", "--resolution", "32", "--batch-size", "16", "--limit-train", "32", "--no-progress"]


def tiny_cfg(tmp: Path, **kw) -> TrainConfig:
    base = dict(variant="compact", data="fake", resolution=32, batch_size=16, limit_train=32, epochs=2,
                warmup_epochs=0.5, run_dir=str(tmp))
    return resolve_config({**base, **kw})


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
    assert set(m["per_class"]) == set(man.classes) and m["top1"] == max(m["model_top1"], m["ema_top1"])
    assert man.training["epochs"] == 2 and man.training["variant"] == "b0-compact" and man.training["seed"] == 0
    folder = Path(rows[0]["path"])
    log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and all("images_per_s" in r and "ema_top1" in r for r in log)
    assert (folder / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The stored weights reproduce the stored top-1 through the service's preprocessing.
    from training.data import load_data

    val = load_data(resolve_config({"data": "fake", "resolution": 32})).val
    x = torch.stack([val[i][0] for i in range(len(val))])
    y = torch.tensor([val[i][1] for i in range(len(val))])
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
    assert result["metrics"]["images_per_s"] is not None and "val_top1" in log[-1]  # evaluated after the last pass
    with pytest.raises(ValueError, match="epochs must be above 0"):
        tiny_cfg(tmp_path, epochs=0)


def test_train_many_trains_side_by_side_and_reports_a_failure(tmp_path, bentoml_home):
    # Two processes at once: one valid variant and one the registry does not know. The valid one is
    # stored anyway, each line says which variant wrote it, and the exit status reports the failure.
    # (`effnet train-many` refuses an unknown name before starting anything, so the failure is provoked
    # through training.parallel.train_many, which it calls.)
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home)}
    extra = ["--epochs", "1", "--eval-every", "0", *TINY]
    cmd = [sys.executable, "-c", "import sys; from training.parallel import train_many; "
           f"sys.exit(train_many(['compact', 'no-such-net'], {extra!r}, threads=0))"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    from training.parallel import threads_per_process

    assert f"2 processes x {threads_per_process(2)} thread(s)" in proc.stdout  # cores // processes, at least 1
    assert any(line.startswith("[compact    ] saved compact-fake:") for line in proc.stdout.splitlines()), proc.stdout
    assert any(line.startswith("[no-such-net]") and "no-such-net" in line[13:] for line in proc.stdout.splitlines())
    assert "failed: no-such-net" in proc.stderr
    assert [r["tag"].split(":")[0] for r in list_checkpoints(bentoml_home)] == ["compact-fake"]


def test_train_many_splits_the_cores_between_its_processes():
    from training.parallel import threads_per_process

    assert threads_per_process(3, cores=2) == 1  # never 0: time-slicing single threads, not oversubscribed pools
    assert threads_per_process(3, cores=8) == 2 and threads_per_process(1, cores=4) == 4


def test_train_many_refuses_a_bad_option_before_starting_anything(bentoml_home):
    with pytest.raises(SystemExit):
        effnet(["train-many", "--variants", "compact", "--epocs", "2", *TINY])  # --epochs misspelt
    with pytest.raises(SystemExit):
        effnet(["train-many", "--variants", "compact", "--variant", "b0", *TINY])
    with pytest.raises(SystemExit):
        effnet(["store", "--no-such-option"])  # other commands still refuse unknown options
    assert list_checkpoints(bentoml_home) == []


@pytest.mark.parametrize("argv, message", [
    (["train", "--variant", "compact", *TINY, "--name", "My Model"], "cannot store a checkpoint named 'my model'"),
    (["train", "--variant", "compact", *TINY, "--name", "../x"], "choose one with --name"),
    (["train", "--variant", "compact", *TINY, "--resolution", "0"], "--resolution must be in [16, 1024]"),
    (["train", "--variant", "compact", *TINY, "--nproc", "0"], "--nproc must be at least 1"),
    (["train-many", "--variants", "compact,b9", *TINY], "unknown variant 'b9'"),
])
def test_training_refuses_what_would_fail_late_before_it_starts(argv, message, bentoml_home, capsys):
    # a name the store refuses used to fail after the whole training, at save time
    assert effnet(argv) == 2
    assert message in capsys.readouterr().err and list_checkpoints(bentoml_home) == []
    assert not (bentoml_home / "runs").exists()


@pytest.mark.parametrize("option, value, interval", [
    ("label_smoothing", 2.0, "[0, 1)"), ("ema_decay", 1.0, "[0, 1)"), ("weight_decay", -0.1, "[0, 10]"),
    ("lr", 0.0, "(0, 10]"), ("log_every", 0, "[1, 1e6]"), ("crop_pad", 5.0, "[0, 0.5]"),
    ("randaugment_magnitude", 31, "[0, 30]"), ("kd_temperature", 0.0, "(0, 100]"), ("lr", "fast", "(0, 10]"),
])
def test_training_options_outside_their_interval_are_refused(option, value, interval, tmp_path):
    from training.config import RECIPES, resolve_config

    with pytest.raises(ValueError, match=re.escape(f"--{option.replace('_', '-')} must be")) as e:
        resolve_config({option: value})
    assert interval in str(e.value)
    (tmp_path / "c.yaml").write_text(f"{option}: {value!r}\n")  # the same from a -c file
    with pytest.raises(ValueError, match=re.escape(interval)):
        resolve_config({}, str(tmp_path / "c.yaml"))
    for recipe in RECIPES:  # and every recipe's own values are inside
        resolve_config({"recipe": recipe})


def test_init_from_a_checkpoint_keeps_its_layers_and_rebuilds_what_does_not_fit(bentoml_home):
    from models import create_model
    from tests.support.serving import make_checkpoint
    from store import load_checkpoint
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


def test_config_precedence_defaults_recipe_yaml_cli(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("recipe: quick\nepochs: 7\nbatch-size: 32\n")
    cfg = resolve_config({"batch_size": 64, "lr": None}, str(f))
    assert cfg.recipe == "quick" and cfg.epochs == 7 and cfg.batch_size == 64  # yaml over recipe, cli over yaml
    assert cfg.resolution == 40 and cfg.label_smoothing == TrainConfig.label_smoothing  # recipe, then defaults
    f.write_text("epoch: 3\n")
    with pytest.raises(ValueError, match="unknown options"):
        resolve_config({}, str(f))


def test_lr_schedule_warms_up_then_follows_a_cosine():
    from training.engine import get_lr

    lrs = [get_lr(s, 100, 10, 1.0, 0.01) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[100] == pytest.approx(0.01)


def test_batch_augment_keeps_uint8_images_and_shapes():
    from training.data import batch_augment

    x = torch.randint(0, 256, (8, 1, 32, 32), dtype=torch.uint8)
    y = batch_augment(x.clone(), pad=4, hflip=True, erase_p=0.5)
    assert y.dtype == torch.uint8 and y.shape == x.shape and not torch.equal(x, y)
    assert torch.equal(batch_augment(x.clone(), pad=0, hflip=False), x)


def test_ema_follows_in_place_updates_of_weights_and_buffers():
    from training.engine import ModelEma

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = ModelEma(net, decay=0.5, warmup=False)
    expected = {k: v.clone().float() for k, v in net.state_dict().items()}
    for _ in range(3):  # what training does: in-place optimizer steps and BN statistics
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        net.train()(torch.randn(8, 3))
        ema.update(net)
        for k, v in net.state_dict().items():
            expected[k] = v.float() if not v.dtype.is_floating_point else expected[k] + 0.5 * (v - expected[k])
    for k, v in ema.module.state_dict().items():
        assert torch.allclose(v.float(), expected[k]), k
    assert int(ema.module[1].num_batches_tracked) == 3


def test_random_erasing_fills_one_rectangle_on_about_the_asked_fraction():
    from training.data import batch_augment

    torch.manual_seed(0)
    x = torch.zeros(400, 1, 32, 32, dtype=torch.uint8)
    y = batch_augment(x, pad=0, hflip=False, erase_p=0.25)
    changed = (y != 0).flatten(1).any(1)
    assert 0.15 < changed.float().mean() < 0.35
    for img in y[changed][:20, 0]:
        rows, cols = (img != 0).any(1).nonzero().flatten(), (img != 0).any(0).nonzero().flatten()
        h, w = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        assert 0.02 * 1024 * 0.5 <= h * w <= 0.2 * 1024 * 1.5  # one rectangle of 2-20% of the area (rounding)


def test_device_batches_shard_like_the_distributed_sampler_and_augment_per_chunk():
    from torch.utils.data.distributed import DistributedSampler

    from training.data import DeviceBatches, TensorImages

    n = 100
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    data = TensorImages(images, torch.arange(n))
    seen = []
    for rank in range(2):
        batches = DeviceBatches(data, batch_size=16, device="cpu", rank=rank, world=2, seed=3)
        sampler = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=True, seed=3, drop_last=True)
        batches.set_epoch(5)
        sampler.set_epoch(5)
        got = [(x, y) for x, y in batches]
        assert len(got) == len(batches) == 50 // 16  # the DataLoader's count with drop_last
        labels = torch.cat([y for _, y in got]).tolist()
        assert labels == list(sampler)[: len(labels)]  # the same order as the DataLoader path
        assert all(torch.equal(x[:, 0, 0, 0].long(), y) for x, y in got)  # images stay with their labels
        seen += labels
    assert len(set(seen)) == len(seen)  # disjoint shards

    calls = []

    def policy(part):
        calls.append(len(part))
        return part + 1

    data = TensorImages(torch.zeros(40, 1, 4, 4, dtype=torch.uint8), torch.zeros(40, dtype=torch.long), policy)
    x, _ = next(iter(DeviceBatches(data, batch_size=20, device="cpu", chunk=8)))
    assert calls == [8, 8, 4] and bool((x == 1).all())


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


def test_imagefolder_layout_trains_with_the_folder_name_as_dataset(tmp_path, bentoml_home):
    from PIL import Image

    root = tmp_path / "tinynet"
    for split in ("train", "val"):
        for k, cls in enumerate(("cat", "dog")):
            (root / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (40 + i, 36), (80 * k + 40, 90, 30 * i)).save(root / split / cls / f"{i}.png")
    out = train_main(resolve_config({"variant": "compact", "data": f"imagefolder:{root}", "resolution": 32,
                                     "batch_size": 4, "epochs": 1, "eval_every": 0, "run_dir": str(tmp_path / "run")}),
                     progress=False)
    man, _ = read_manifest(out["tag"])
    assert out["tag"].startswith("compact-tinynet:") and man.classes == ["cat", "dog"]
    assert man.in_chans == 3 and not man.grayscale and man.resize == 37 and man.metrics["eval_images"] == 8


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_is_one_channel_resized_as_the_service_resizes():
    from store import Manifest, resize_crop
    from training.data import FASHION_MNIST_CLASSES, _fashion_mnist_files, _read_idx, load_data

    spec = load_data(resolve_config({"data": "fashion-mnist", "resolution": 40, "limit_train": 8, "limit_val": 8}))
    assert spec.classes == FASHION_MNIST_CLASSES and spec.in_chans == 1 and spec.grayscale and spec.resize == 40
    raw = _read_idx(_fashion_mnist_files()["val_x"])[:8].unsqueeze(1)
    man = Manifest(variant="", config={}, num_classes=10, classes=[], dataset="", resolution=40, in_chans=1, resize=40)
    assert torch.equal(torch.stack([spec.val[i][0] for i in range(8)]), resize_crop(raw, man))
    assert len(spec.train) == 8 and spec.val[0][0].dtype == torch.uint8


def test_an_undecodable_file_in_an_imagefolder_is_logged_and_replaced_by_the_next(tmp_path, caplog):
    from PIL import Image

    from training.data import ImageFiles

    for i in range(3):
        Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "1.png").write_bytes((tmp_path / "1.png").read_bytes()[:30])  # truncated
    ds = ImageFiles(tmp_path.parent, [tmp_path.name], transform=lambda x: x)
    with caplog.at_level("WARNING", logger="effnet.data"):
        got = [ds[i][0][0, 0, 0].item() for i in range(3)] + [ds[1][0][0, 0, 0].item()]
    assert got == [0, 120, 120, 120]  # 1.png -> the next, 2.png, every time
    assert sum("1.png: it cannot be decoded" in r.message for r in caplog.records) == 1


def _folder_of_images(root: Path, layout: dict[str, int], size=(20, 16)) -> None:
    """`layout`: {"train/cat": 3, ...} -> that many small distinct PNGs in each folder."""
    from PIL import Image

    for folder, n in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", size, (40 * i % 256, 90, 30)).save(root / folder / f"{i}.png")


def test_an_imagefolder_is_decoded_as_the_service_decodes_every_allowed_format(tmp_path):
    # torchvision.io alone gave an animated GIF as 2 frames (torch.stack failed), a 16-bit PNG as
    # uint16 (promotion error) and refused every valid BMP.
    import numpy as np
    from PIL import Image

    from store.images import decode_image
    from training.data import ImageFiles

    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    frames = [Image.new("RGB", (12, 10), c) for c in ((200, 0, 0), (0, 200, 0))]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    Image.fromarray(np.full((10, 12), 40000, dtype=np.uint16)).save(folder / "deep.png")
    Image.new("RGB", (12, 10), (10, 20, 30)).save(folder / "plain.bmp")
    Image.new("CMYK", (12, 10), (0, 255, 0, 0)).save(folder / "print.jpg")
    Image.new("RGBA", (12, 10), (0, 0, 0, 0)).save(folder / "clear.webp")
    ds = ImageFiles(tmp_path / "train", ["a"], transform=lambda x: x)
    assert len(ds) == 5
    for i, (path, _) in enumerate(ds.samples):
        x = ds[i][0]
        assert x.dtype == torch.uint8 and tuple(x.shape) == (3, 10, 12), path
        assert np.array_equal(x.numpy(), decode_image(path.read_bytes(), max_pixels=10**6)), path
    assert not ds.bad
    # the service's own module still has every name, from the one decoder
    import service.images

    assert service.images.decode_image is decode_image


def test_an_imagefolder_of_undecodable_files_is_a_clean_error(tmp_path, bentoml_home, capsys):
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / "d" / split / cls).mkdir(parents=True)
            for i in range(9):
                (tmp_path / "d" / split / cls / f"{i}.jpg").write_bytes(b"not a jpeg")
    assert effnet(["train", "--variant", "compact", "--data", f"imagefolder:{tmp_path / 'd'}", "--resolution", "32",
                   "--batch-size", "4", "--epochs", "1", "--no-progress", "--run-dir", str(tmp_path / "run")]) == 2
    assert "cannot be decoded" in capsys.readouterr().err


def test_imagefolder_layout_quirks_are_ignored_warned_or_refused(tmp_path, caplog):
    from training.data import load_data

    root = tmp_path / "set"
    _folder_of_images(root, {
        "train/cat": 6, "train/dog": 6, "train/onlytrain": 2, "train/empty": 0,
        "train/.ipynb_checkpoints": 2, "train/@eaDir": 2, "train/__MACOSX": 2, "train/cat/.hidden": 2,
        "val/cat": 2, "val/dog": 2, "val/onlyval": 2, "outside/more": 3,
    })
    (root / "train" / "dog" / "linked").symlink_to(root / "outside" / "more", target_is_directory=True)
    (root / "outside" / "more" / "loop").symlink_to(root / "train" / "dog", target_is_directory=True)
    with caplog.at_level("WARNING", logger="effnet.data"):
        spec = load_data(resolve_config({"data": f"imagefolder:{root}", "resolution": 32}))
    assert spec.classes == ["cat", "dog", "empty", "onlytrain"]  # no hidden or system folders
    assert len(spec.train) == 6 + 6 + 3 + 2  # the symlinked sub-folder followed once, the loop not again
    warned = " ".join(r.message for r in caplog.records)
    assert "['onlyval']" in warned and "['empty']" in warned and "['empty', 'onlytrain']" in warned
    # --limit-train takes from every class (the first N files in class order were all cats), seeded
    cfg = resolve_config({"data": f"imagefolder:{root}", "resolution": 32, "limit_train": 6, "limit_val": 2})
    picked = load_data(cfg).train.samples
    assert sorted({label for _, label in picked}) == [0, 1, 3] and len(picked) == 6
    assert picked == load_data(cfg).train.samples
    assert picked != load_data(resolve_config({**cfg.to_dict(), "seed": 1})).train.samples
    assert {label for _, label in load_data(cfg).val.samples} == {0, 1}
    # one class is refused
    _folder_of_images(tmp_path / "one", {"train/only": 3, "val/only": 2})
    with pytest.raises(ValueError, match="at least 2 class"):
        load_data(resolve_config({"data": f"imagefolder:{tmp_path / 'one'}", "resolution": 32}))


def test_per_class_accuracy_is_null_for_a_class_without_validation_images():
    from training.engine import evaluate

    class Always0(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([[1.0, 0.0, 0.0]]).expand(len(x), 3)

    batches = [(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 0, 1, 1]))]
    out = evaluate(Always0(), batches, lambda x: x.float(), 3, torch.device("cpu"), channels_last=False)
    assert out["per_class"] == [1.0, 0.0, None]


@pytest.mark.parametrize("yaml_text, argv, message", [
    ("epochs: [1\n", [], "is not valid YAML"),
    ("name: 123\n", [], "--name must be a string"),
    ('hflip: "no"\n', [], "--hflip must be true or false"),
    ("", ["--data", "imagefolder:"], "empty path"),
    ("", ["--limit-train", "1"], "at least 2 images"),
    ("", ["--run-dir", "FILE"], "is a file"),
])
def test_bad_configuration_is_a_one_line_error(yaml_text, argv, message, tmp_path, bentoml_home, capsys):
    (tmp_path / "c.yaml").write_text(yaml_text)
    (tmp_path / "afile").write_text("")
    argv = [str(tmp_path / "afile") if a == "FILE" else a for a in argv]
    assert effnet(["train", "--variant", "compact", "-c", str(tmp_path / "c.yaml"), *TINY, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_bare_resume_uses_the_stored_configuration_and_refuses_what_differs(tmp_path, bentoml_home, capsys):
    run = tmp_path / "run"
    argv = ["train", "--variant", "compact", "--epochs", "2", "--eval-every", "0", "--bn-recalibrate", "1",
            "--stop-after-epoch", "1", "--run-dir", str(run), *TINY]
    assert effnet(argv) == 0
    state = json.loads((run / "state.json").read_text())
    # what a damaged or foreign state gives: one line naming the problem
    for damage, message in (("missing", "lacks epoch"), ("truncated", "sha256 does not match"),
                            ("variant", "--variant 'compact'")):
        bad = tmp_path / damage
        shutil.copytree(run, bad)
        extra = []
        if damage == "missing":
            (bad / "state.json").write_text(json.dumps({k: v for k, v in state.items() if k != "epoch"}))
        elif damage == "truncated":
            os.truncate(bad / "state.safetensors", 100_000)
        else:
            extra = ["--variant", "mec"]
        capsys.readouterr()
        assert effnet(["train", "--resume", str(bad), "--no-progress", *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    # bare: the stored configuration (compact, fake, 32x32, batch 16); it was the defaults (b0, 64) before
    assert effnet(["train", "--resume", str(run), "--no-progress", "--threads", "1"]) == 0
    rows = list_checkpoints(bentoml_home)
    assert len(rows) == 1 and rows[0]["variant"] == "compact" and rows[0]["resolution"] == 32
    assert json.loads((run / "state.json").read_text())["exported"] == rows[0]["tag"]
    # a finished run: nothing to do, no identical second version; under another name, the same
    capsys.readouterr()
    assert effnet(["train", "--resume", str(run), "--no-progress", "--name", "other"]) == 0
    assert "already finished" in capsys.readouterr().out and len(list_checkpoints(bentoml_home)) == 1
    assert not (bentoml_home / "runs").exists()  # the state stayed in the resume dir


def test_a_run_dir_in_use_is_refused_naming_the_other_run(tmp_path):
    from training.train import lock_run_dir

    held = lock_run_dir(tmp_path / "run")
    with pytest.raises(ValueError, match=f"in use by another training \\(pid {os.getpid()}"):
        lock_run_dir(tmp_path / "run")
    held.close()  # the lock goes with its holder
    lock_run_dir(tmp_path / "run").close()


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_an_interrupted_run_says_where_its_state_is_and_how_to_resume(sig, tmp_path, bentoml_home, capsys,
                                                                    monkeypatch):
    import signal

    import training.train as train

    def interrupted_in_epoch_2(cfg, resume=None, progress=True):
        run = Path(cfg.run_dir)
        run.mkdir(parents=True)
        (run / "state.json").write_text(json.dumps({"epoch": 0}))
        if sig == "SIGTERM":  # was: killed without a word. The handler is called as the signal would call it:
            # a real SIGTERM to the test process would end the whole test session if it were not installed.
            handler = signal.getsignal(signal.SIGTERM)
            assert callable(handler) and handler is not before
            handler(signal.SIGTERM, None)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "main", interrupted_in_epoch_2)
    before = signal.getsignal(signal.SIGTERM)
    assert effnet(["train", "--variant", "compact", *TINY, "--run-dir", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert f"state after epoch 1 is saved in {tmp_path / 'run'}" in err
    assert f"effnet train --resume {tmp_path / 'run'}" in err
    assert signal.getsignal(signal.SIGTERM) == before


def test_import_pretrained_twice_stores_one_version(bentoml_home, capsys, monkeypatch):
    from models import create_model, model_config
    from store import Manifest, save_checkpoint
    from training import pretrained

    def fake_import(name):
        man = Manifest(variant="compact", config=model_config("compact").to_dict(), num_classes=2, classes=["a", "b"],
                       dataset="x", resolution=32)
        return save_checkpoint(create_model("compact", num_classes=2), man, name=name)

    monkeypatch.setitem(pretrained.IMPORTERS, "lite0", ("lite0-imagenet", fake_import))
    assert effnet(["import-pretrained", "lite0"]) == 0 and effnet(["import-pretrained", "lite0"]) == 0
    assert "already in the store" in capsys.readouterr().out and len(list_checkpoints(bentoml_home)) == 1
