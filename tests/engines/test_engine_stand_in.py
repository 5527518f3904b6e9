"""auto's recorded engine when its stored files are damaged: a stand-in serves at once and the recorded
one is rebuilt behind it (engines/loader.py), and the worker swaps it in (service/workers.py)."""
from __future__ import annotations

import json

import pytest
import torch

from engines import load_engine
from engines.export import cache_dir
from store import read_manifest
from tests.engines.tiny_store import RUNNABLE, _copy_store, _images, _reference



def test_a_damaged_recorded_engine_is_stood_in_for_and_rebuilt_in_the_background(store, tmp_path, monkeypatch):
    """auto's recorded engine with a truncated file: the next fastest recorded engine whose files are whole
    serves at once (nothing timed), and the recorded one is rebuilt behind it, whole again."""
    import engines.loader as loader

    if "onnxruntime-int8" not in RUNNABLE:
        pytest.skip("onnxruntime-int8 cannot run here")
    home, tag = store
    home = _copy_store(home, tmp_path)
    man, folder = read_manifest(tag, home)
    load_engine(tag, engine="auto", threads=1, home=str(home), batch_sizes=(1, 4), auto_seconds=0.3)
    record = cache_dir(folder, man) / loader.AUTO_RECORD
    data = json.loads(record.read_text())
    for rec in data["choices"]:  # as if int8 had won, onnxruntime second
        rec["engine"], rec["timings_ms"] = "onnxruntime-int8", {"onnxruntime-int8": 1.0, "onnxruntime": 2.0,
                                                                  "torch": 3.0}
    record.write_text(json.dumps(data))
    int8 = next(cache_dir(folder, man).rglob("model.int8.onnx"))
    whole_bytes = int8.read_bytes()
    with open(int8, "r+b") as f:
        f.truncate(len(whole_bytes) // 2)
    monkeypatch.setattr(loader, "time_engines", lambda *a, **k: pytest.fail("a recorded choice must not be timed"))

    eng, _ = load_engine(tag, engine="auto", threads=1, home=str(home), batch_sizes=(1, 4))
    assert eng.name == "onnxruntime" and "stand-in while its recorded choice onnxruntime-int8" in eng.reason
    x, _ = _images(4, seed=7)
    assert eng(x).argmax(1).tolist() == _reference(tag, home, x).argmax(1).tolist()
    rebuilt = eng.upgrade.result(timeout=300)
    assert rebuilt is not None and rebuilt.name == "onnxruntime-int8" and "rebuilt in" in rebuilt.reason
    assert rebuilt.verification.ok and rebuilt(x).shape == (4, 4)
    from store.durable import intact
    assert intact(int8)
    again, _ = load_engine(tag, engine="auto", threads=1, home=str(home), batch_sizes=(1, 4))
    assert again.name == "onnxruntime-int8" and again.upgrade is None  # the next start loads it directly


def test_a_runner_swaps_in_the_rebuilt_engine_at_its_next_batch():
    """service/workers.py: a stand-in's finished upgrade replaces it; a failed one leaves it serving."""
    from concurrent.futures import Future

    import numpy as np

    from service.workers import VariantRunner

    class Fake:
        def __init__(self, name, score):
            self.name, self.score, self.upgrade = name, score, None

        def __call__(self, x):
            out = torch.zeros(len(x), 2)
            out[:, self.score] = 10.0
            return out

    runner = VariantRunner.__new__(VariantRunner)
    runner.v = type("V", (), {"name": "b0"})()
    runner.manifest = type("M", (), {"temperature": 1.0})()
    stand_in, rebuilt = Fake("onnxruntime", 0), Fake("onnxruntime-int8", 1)
    runner.engines, runner.engine = {1: stand_in}, stand_in
    stand_in.upgrade = Future()
    images = np.zeros((2, 3, 4, 4), dtype=np.uint8)
    assert runner._infer(images, 1).argmax(1).tolist() == [0, 0]  # not done yet: the stand-in serves
    stand_in.upgrade.set_result(rebuilt)
    assert runner._infer(images, 1).argmax(1).tolist() == [1, 1]
    assert runner.engines[1] is rebuilt and runner.engine is rebuilt and stand_in.upgrade is None
    failed = Fake("torch", 0)
    failed.upgrade = Future()
    failed.upgrade.set_exception(RuntimeError("export failed"))
    runner.engines = {1: failed}
    assert runner._infer(images, 1).argmax(1).tolist() == [0, 0] and runner.engines[1] is failed


def test_an_artefact_stored_without_its_sidecar_gets_one_and_a_refused_choice_is_stood_in_for(store, tmp_path,
                                                                                           monkeypatch):
    """A file from before sizes and hashes were recorded gets its sidecar once it verifies; a recorded
    choice that fails to load anyway (damaged, no sidecar to tell) yields to the next fastest of the
    record, with nothing timed."""
    import engines.loader as loader
    from store.durable import sidecar

    if "onnxruntime-int8" not in RUNNABLE:
        pytest.skip("onnxruntime-int8 cannot run here")
    home, tag = store
    home = _copy_store(home, tmp_path)
    man, folder = read_manifest(tag, home)
    int8 = next(cache_dir(folder, man).rglob("model.int8.onnx"))
    sidecar(int8).unlink()
    load_engine(tag, engine="onnxruntime-int8", threads=1, home=str(home), batch_sizes=(1, 4))
    assert sidecar(int8).is_file()  # recorded once verified

    load_engine(tag, engine="auto", threads=1, home=str(home), batch_sizes=(1, 5), auto_seconds=0.3)
    record = cache_dir(folder, man) / loader.AUTO_RECORD
    data = json.loads(record.read_text())
    for rec in data["choices"]:
        rec["engine"], rec["timings_ms"] = "onnxruntime-int8", {"onnxruntime-int8": 1.0, "onnxruntime": 2.0}
    record.write_text(json.dumps(data))
    sidecar(int8).unlink()
    int8.write_bytes(b"not a model")  # damaged, and nothing recorded says so
    monkeypatch.setattr(loader, "time_engines", lambda *a, **k: pytest.fail("nothing may be timed"))
    eng, _ = load_engine(tag, engine="auto", threads=1, home=str(home), batch_sizes=(1, 5))
    assert eng.name == "onnxruntime" and "recorded choice onnxruntime-int8 being refused now" in eng.reason
    assert eng.upgrade is None
