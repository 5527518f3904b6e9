"""Engine caches that outlive damage: truncated files are rebuilt, a read-only store serves from what
it has and writes to the state folder (engines/export.py, engines/calibration.py)."""
import pytest
import torch

from engines import calibration, export
from store import durable, read_manifest
from tests.support.serving import FASHION_CLASSES, make_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    home = tmp_path_factory.mktemp("caches") / "bentoml"
    tag = make_checkpoint(home, "compact-fashion-mnist", "compact", FASHION_CLASSES, 32, grayscale=True)
    return read_manifest(tag, str(home))


@pytest.fixture
def state(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFNET_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


def _fake_export(calls):
    def export_onnx(model, manifest, out):  # writes as the real one does: a temporary file, renamed
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_bytes(b"exported %d" % len(calls))
        calls.append(out)
        export._publish(tmp, out)
        return out
    return export_onnx


def test_a_truncated_export_is_made_again_instead_of_loaded(checkpoint, state, monkeypatch):
    manifest, folder = checkpoint
    calls = []
    monkeypatch.setattr(export, "export_onnx", _fake_export(calls))
    first = export.onnx_path(lambda: None, manifest, folder)
    assert export.onnx_path(lambda: None, manifest, folder) == first and len(calls) == 1  # cached
    assert first.is_relative_to(folder) and durable.intact(first)
    with open(first, "r+b") as f:
        f.truncate(3)
    again = export.onnx_path(lambda: None, manifest, folder)
    assert again == first and len(calls) == 2 and durable.intact(again) and again.read_bytes() == b"exported 1"


def test_a_read_only_store_serves_its_exports_and_writes_new_ones_to_the_state_folder(checkpoint, state, monkeypatch):
    manifest, folder = checkpoint
    calls = []
    monkeypatch.setattr(export, "export_onnx", _fake_export(calls))
    beside = export.onnx_path(lambda: None, manifest, folder)  # made while the store could be written
    monkeypatch.setattr(export, "writable", lambda path: not str(path).startswith(str(folder)))
    before = len(calls)
    assert export.onnx_path(lambda: None, manifest, folder) == beside and len(calls) == before  # read, not made
    assert export.cache_dir(folder, manifest).is_relative_to(state)
    beside.unlink()
    made = export.onnx_path(lambda: None, manifest, folder)
    assert made.is_relative_to(state) and durable.intact(made) and len(calls) == before + 1
    assert not beside.exists()


def test_a_truncated_calibration_cache_is_generated_again(checkpoint, tmp_path, monkeypatch):
    manifest, folder = checkpoint
    images = torch.randint(0, 256, (8, 1, 32, 32), dtype=torch.uint8)
    monkeypatch.setattr(calibration, "_is_fashion", lambda m: True)
    monkeypatch.setattr(calibration, "fashion_mnist", lambda split, m, limit=None, seed=0: calibration.CalibrationSet(
        images, torch.zeros(8, dtype=torch.int64), "stand-in training split"))
    cache = tmp_path / "cache"
    first = calibration.load_calibration(folder, manifest, cache)
    cached = cache / calibration.CALIBRATION_FILE
    assert durable.intact(cached) and "generated" in first.source
    assert calibration.load_calibration(folder, manifest, cache).source == first.source  # read back from the cache
    with open(cached, "r+b") as f:
        f.truncate(100)
    again = calibration.load_calibration(folder, manifest, cache)
    assert torch.equal(again.images, images) and durable.intact(cached)


def test_a_damaged_calibration_set_in_the_checkpoint_is_not_used(checkpoint, tmp_path):
    manifest, folder = checkpoint
    images = torch.randint(0, 256, (8, 1, 32, 32), dtype=torch.uint8)
    path = calibration.save_calibration(folder, images)
    try:
        assert durable.intact(path)
        assert calibration.load_calibration(folder, manifest).source.startswith("checkpoint calibration set")
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)
        assert not calibration.load_calibration(folder, manifest).source.startswith("checkpoint calibration set")
    finally:
        path.unlink()
        durable.sidecar(path).unlink()
