"""`effnet serve --check` and `--prepare`: what is still to be done before a worker loads its engine, and doing it."""
import pytest

from cli.main import main
from tests.support.serving import make_checkpoint, write_config


def _config(tmp_path, engine: str):
    return str(write_config(tmp_path / f"{engine}.yaml", {
        "server": {"cpu_threads": 1},
        "variants": {"pets": {"model": "compact-pets:latest", "engine": engine, "max_batch_size": 2}},
        "routes": {"pets": {"split": ["pets"]}},
    }))


def test_check_names_a_missing_checkpoint(bentoml_home, tmp_path, capsys):
    assert main(["serve", "--check", "--config", _config(tmp_path, "torch")]) == 1
    assert "variant 'pets': checkpoint 'compact-pets:latest' not found" in capsys.readouterr().err


def test_the_eager_engine_needs_no_preparation(bentoml_home, tmp_path, capsys):
    make_checkpoint(bentoml_home, "compact-pets", "compact", ["cat", "dog"], 32)
    assert main(["serve", "--check", "--config", _config(tmp_path, "torch")]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.server  # `--prepare` exports in `effnet export` child processes
def test_prepare_exports_and_verifies_what_check_says_is_missing(bentoml_home, tmp_path, capsys):
    make_checkpoint(bentoml_home, "compact-pets", "compact", ["cat", "dog"], 32)
    config = _config(tmp_path, "onnxruntime")
    assert main(["serve", "--check", "--config", config]) == 1
    assert "engine onnxruntime is not exported and verified yet" in capsys.readouterr().err

    assert main(["serve", "--prepare", "--config", config]) == 0
    out = capsys.readouterr().out
    assert "pets       onnxruntime fp32 on cpu, 1 thread(s), batch sizes [1, 2]" in out
    assert main(["serve", "--check", "--config", config]) == 0
