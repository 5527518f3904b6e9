"""`effnet train`, `train-many` and `import-pretrained` as commands: configuration precedence and
refusals, resume rules, run-folder locks, interruption, and training variants side by side."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli.main import main as effnet
from store import list_checkpoints
from tests.training.tiny import ROOT, TINY
from training import TrainConfig, resolve_config


def test_config_precedence_defaults_recipe_yaml_cli(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("recipe: quick\nepochs: 7\nbatch-size: 32\n")
    cfg = resolve_config({"batch_size": 64, "lr": None}, str(f))
    assert cfg.recipe == "quick" and cfg.epochs == 7 and cfg.batch_size == 64  # yaml over recipe, cli over yaml
    assert cfg.resolution == 40 and cfg.label_smoothing == TrainConfig.label_smoothing  # recipe, then defaults
    f.write_text("epoch: 3\n")
    with pytest.raises(ValueError, match="unknown options"):
        resolve_config({}, str(f))


def test_the_former_name_limit_val_still_sets_limit_test(tmp_path):
    from training.options import get_args_parser, resume_config

    f = tmp_path / "c.yaml"
    f.write_text("limit-val: 5\n")  # a YAML file
    assert resolve_config({}, str(f)).limit_test == 5
    assert resolve_config({"limit_val": 6}).limit_test == 6  # a mapping of options
    args = get_args_parser().parse_args(["--limit-val", "7"])  # the command line
    assert resolve_config(vars(args)).limit_test == 7
    with pytest.raises(ValueError, match="former name"):
        resolve_config({"limit_val": 1, "limit_test": 2})
    # a training state whose configuration says limit_val resumes with that limit
    stored = {**resolve_config({"variant": "compact", "data": "fake"}).to_dict(), "limit_val": 3}
    del stored["limit_test"]
    (tmp_path / "run").mkdir()
    meta = {"epoch": 0, "step": 1, "ema_updates": 1, "config": stored, "optimizer": {}, "scaler": {}, "rng": {},
            "tensors_sha256": ""}
    (tmp_path / "run" / "state.json").write_text(json.dumps(meta))
    assert resume_config(get_args_parser().parse_args(["--resume", str(tmp_path / "run")])).limit_test == 3


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


@pytest.mark.server
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
