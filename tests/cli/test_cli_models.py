"""`effnet models` and `effnet bench` as a user runs them."""
import json
import os

import pytest

from cli.main import main


def test_models_json_lists_every_variant_with_its_figures(capsys):
    from models import list_models

    assert main(["models", "--json", "--resolution", "64"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list_models()
    for r in rows:
        assert {"name", "family", "params", "macs", "seed_params"} <= set(r)
        assert r["params"] > 0 and r["macs"] > 0
    b0 = next(r for r in rows if r["name"] == "b0")
    assert b0["seed_params"] == 5.29e6 and abs(b0["params_diff_pct"]) < 0.5


def test_models_table_shows_differences_and_other_class_counts(capsys):
    assert main(["models", "--family", "b0-se", "--num-classes", "10", "--resolution", "32"]) == 0
    out = capsys.readouterr().out
    assert "b0-nose-all" in out and "lite0" not in out
    assert "10 classes" in out


def test_bench_json_rows_include_the_reference(capsys):
    argv = ["bench", "--json", "--models", "compact,torchvision-b0", "--batches", "1,2",
            "--resolution", "32", "--rounds", "1", "--seconds", "0.01"]
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["name"], r["batch"]) for r in rows} == {
        ("compact", 1), ("compact", 2), ("torchvision-b0", 1), ("torchvision-b0", 2)}
    for r in rows:
        assert r["latency_ms"] > 0 and r["images_per_s"] > 0
        assert abs(r["images_per_s"] - r["batch"] * 1000 / r["latency_ms"]) / r["images_per_s"] < 0.01


def test_a_users_mistake_is_one_message_and_exit_2_not_a_traceback(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("EFFNET_DEBUG", raising=False)
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path))
    assert main(["export", "nope:latest"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("effnet export: error: checkpoint 'nope:latest' not found") and "Traceback" not in err


def test_our_own_faults_keep_their_traceback(monkeypatch):
    import argparse

    import pytest

    import cli.main as cli_main

    def broken(args):
        raise RuntimeError("a bug of ours")

    parser = argparse.ArgumentParser()
    parser.set_defaults(func=broken, command="x")
    monkeypatch.setattr(cli_main, "build_parser", lambda: parser)
    with pytest.raises(RuntimeError, match="a bug of ours"):
        cli_main.main([])


@pytest.mark.parametrize("argv, message", [
    (["models", "--num-classes", "0"], "argument --num-classes: expected 1..100000, got 0"),  # ZeroDivisionError before
    (["models", "--resolution", "0"], "argument --resolution: expected 32..4096"),  # a traceback from conv2d before
    (["bench", "--batches", "8,0"], "each batch size is 1..1024"),  # measured and printed batch 0 before
    (["bench", "--seconds", "nan"], "argument --seconds: expected 0.001..3600 s"),
    (["bench", "--threads", "-1"], "argument --threads: expected 0..1024"),
    (["export", "x:latest", "--batch-sizes", "1,x"], "expected comma-separated integers"),
    (["train-bench", "--rounds", "0"], "argument --rounds: expected 1..1000"),
    (["export", "x:latest", "--home", "/no/such/store"], "store '/no/such/store' is not a folder"),  # made it
    (["loadtest", "--store", "/no/such/store"], "store '/no/such/store' is not a folder"),
])
def test_out_of_range_options_are_refused_while_parsing(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not os.path.exists("/no/such/store")


def test_bench_progress_is_plain_lines_when_stderr_is_not_a_terminal(capsys):
    argv = ["bench", "--models", "compact", "--batches", "1", "--resolution", "32", "--rounds", "2",
            "--seconds", "0.01"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.splitlines()[:2] == ["round 1/2 compact batch 1", "round 2/2 compact batch 1"]
