"""`effnet build --pack-models`: the bento carries the served checkpoints and their prepared engines, and a
worker of that bento, served from an otherwise-empty BENTOML_HOME, verifies and loads them.

There is no Docker engine here, so no image is built: the bento is laid out as `bentoml containerize`
lays it out in the image (the bento's folder, its models resolved into `models/`), and loaded by
BentoML's own bento loader in a fresh process, as the image's entrypoint (`bentoml serve $BENTO_PATH`)
loads it.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

# In a fresh process whose working directory is not the repository, so that every module comes from the
# bento: BentoML's loader, then the body of the variant's worker, twice (intact, then damaged weights).
SERVE_FROM_BENTO = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from bentoml._internal.service.loader import load
    from bentoml._internal.utils import circus

    image = Path(sys.argv[1])
    load(str(image))
    import service.workers, store.paths
    from service.config import load_config
    from service.workers import VariantRunner
    from store import read_manifest

    cfg = load_config()
    v = cfg.variants["compact"]
    runner = VariantRunner(v, cfg, use_gpu=False)
    out = {"code": service.workers.__file__, "models": str(store.paths.models_dir()), "error": runner.error,
           "engine": runner.engine and runner.engine.name,
           "respawn_s": getattr(circus.Arbiter, "_effnet_respawn_s", None),
           "sockets_kept": getattr(circus.Arbiter, "_effnet_sockets_kept", False)}
    manifest, folder = read_manifest(v.model)
    weights = folder / manifest.weights_file
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    out["damaged_error"] = VariantRunner(v, cfg, use_gpu=False).error
    print(json.dumps(out))
""")


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.mark.long  # about 40 s of CPU (53-84 s on 2 busy cores), most of it the ONNX export a packed bento carries: make test-long
@pytest.mark.server  # `effnet build` and a loaded bento, each in a child process
def test_a_packed_bento_carries_its_checkpoints_and_engines_and_serves_them_without_a_store(tmp_path):
    from tests.support.fake_store import make_fake_store

    home, empty = tmp_path / "home", tmp_path / "empty-home"
    config = make_fake_store(home, {"compact": ("compact", "fashion-mnist")}, shadow=None)
    spec = yaml.safe_load(config.read_text())
    # An engine that is exported (eager PyTorch needs no artefact); two batch sizes to verify, not eight.
    spec["variants"]["compact"].update(engine="onnxruntime", max_batch_size=2)
    config.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    env.pop("EFFNET_STATE_DIR", None)
    r = subprocess.run([sys.executable, "-m", "cli", "build", "--pack-models", "--config", str(config)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    # The bento declares the served checkpoint, by its exact version.
    tag = spec["variants"]["compact"]["model"]
    (bento,) = (home / "bentos" / "effnet-serving").glob("*/bento.yaml")
    info = yaml.safe_load(bento.read_text())
    assert [m["tag"] for m in info["models"]] == [tag] and info["labels"]["checkpoints"] == "packed"
    assert info["service"] == "cli.build:Gateway"

    # The image's layout: the bento, its models resolved into models/ (bentoml containerize does the same).
    image = tmp_path / "image"
    shutil.copytree(bento.parent, image)
    from bentoml._internal.models.model import ModelStore, copy_model

    copy_model(tag, src_model_store=ModelStore(home / "models"), target_model_store=ModelStore(image / "models"))
    packed = image / "models" / tag.replace(":", "/")
    assert (packed / "model.safetensors").is_file() and (packed / "manifest.json").is_file()
    assert list(packed.glob("engines/*/onnx-*/model.onnx")), "the exported engine travels with the checkpoint"
    before = _files(image / "models")

    # Served from an empty BENTOML_HOME: the worker finds the bento's own store, verifies and loads its engine.
    empty.mkdir()
    env = {**env, "BENTOML_HOME": str(empty)}
    r = subprocess.run([sys.executable, "-c", SERVE_FROM_BENTO, str(image)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["code"].startswith(str(image / "src"))
    assert out["models"] == str((image / "models").resolve())
    assert out["error"] is None and out["engine"] == "onnxruntime", out
    # Nothing was exported or chosen again at start: the bento's files are as built, the state folder has no engines.
    after = {f: t for f, t in _files(image / "models").items() if not f.endswith(".lock")}
    changed = {f for f in after if f != str(packed.relative_to(image / "models") / "model.safetensors")
               and after[f] != before.get(f)}
    assert not changed, changed
    assert not (empty / "effnet-state" / "engines").exists()
    assert not any((empty / "models").iterdir()) if (empty / "models").exists() else True
    # The weights are still checked: damaged ones leave the worker not ready, saying why.
    assert "sha256" in out["damaged_error"], out
    # The bento serves under the supervision of `effnet serve` (cli/bentoml_serve.py).
    assert out["respawn_s"] == 0.5 and out["sockets_kept"]


def test_the_store_follows_the_model_store_that_bentoml_sets_for_a_bento_and_only_then(tmp_path, monkeypatch):
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models.model import ModelStore

    from store.paths import models_dir

    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "home"))
    assert models_dir() == tmp_path / "home" / "models"
    own = tmp_path / "bento" / "models"
    own.mkdir(parents=True)
    with BentoMLContainer.model_store.patch(ModelStore(own)):  # what BentoML's loader does for such a bento
        assert models_dir() == own.resolve()
        assert models_dir(tmp_path / "other") == tmp_path / "other" / "models"  # a store named outright wins
    assert models_dir() == tmp_path / "home" / "models"


def test_a_process_of_a_containerized_bento_that_bentoml_did_not_load_reads_the_bentos_store(tmp_path, monkeypatch):
    from store.paths import models_dir

    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("BENTO_PATH", str(tmp_path / "bento"))
    assert models_dir() == tmp_path / "home" / "models"  # the bento carries no models: the home's store
    (tmp_path / "bento" / "models" / "b0-fashion-mnist" / "v1").mkdir(parents=True)
    assert models_dir() == (tmp_path / "bento" / "models").resolve()  # `python -m cli.worker` in the image
