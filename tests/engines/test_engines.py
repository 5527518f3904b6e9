"""Compiled engines: export, verification against eager, refusal, auto, the export cache, threads.

One tiny checkpoint (tests/engines/tiny_store.py) is exported once per session: the ONNX exporter takes
15-30 s on these 2 cores, so every test shares that store (copied where a test damages it).
torch-compile is not exercised: its first call compiles for about 45 s per batch size here.
"""
from __future__ import annotations

import json
import logging

import pytest
import torch

from engines import ENGINES, load_engine, worker_threads
from engines.base import run_in_buckets
from engines.calibration import CALIBRATION_FILE, load_calibration
from engines.export import cache_dir
from store import Manifest, fashion_mnist, read_manifest
from tests.engines.tiny_store import RES, RUNNABLE, _copy_store, _images, _reference

@pytest.mark.parametrize("name", RUNNABLE)
def test_every_engine_exports_and_verifies_against_eager(store, name):
    home, tag = store
    eng, man = load_engine(tag, engine=name, threads=2, home=str(home))
    assert eng.name == name, eng.describe()  # not a fallback
    d = eng.describe()
    assert d["verification"]["ok"] and d["precision"] == ENGINES[name].precision
    x, _ = _images(10, seed=7)  # 10: not one of the batch sizes, so padding and splitting run too
    out, ref = eng(x), _reference(tag, home, x)
    assert out.shape == (10, 4) and out.dtype == torch.float32
    if eng.precision == "fp32":
        torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)
    else:
        assert d["verification"]["agreement"] >= 0.99
        assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.9
    # grayscale input (1 channel) is accepted like the eager reference accepts it
    gray = x[:, :1]
    assert (eng(gray).argmax(1) == _reference(tag, home, gray).argmax(1)).float().mean() >= 0.9


def test_export_cache_is_reused_on_restart(store, monkeypatch):
    home, tag = store
    man, folder = read_manifest(tag, home)
    onnx_files = list(cache_dir(folder, man).rglob("model.onnx"))
    assert len(onnx_files) == 1 and man.sha256[:16] in str(onnx_files[0])
    mtime = onnx_files[0].stat().st_mtime_ns

    def no_export(*a, **k):
        raise AssertionError("exported again")

    monkeypatch.setattr("engines.export.export_onnx", no_export)
    monkeypatch.setattr("engines.export.quantize_int8", no_export)
    for name in RUNNABLE:
        eng, _ = load_engine(tag, engine=name, threads=2, home=str(home))
        assert eng.name == name and "(recorded " in eng.reason  # the verdict is reused as well
    assert onnx_files[0].stat().st_mtime_ns == mtime
    records = json.loads((cache_dir(folder, man) / "verification.json").read_text())
    assert {n for n, r in records.items() if r["ok"]} >= set(RUNNABLE)


@pytest.mark.skipif("openvino-int8" not in RUNNABLE, reason="OpenVINO int8 does not run on this CPU")
def test_openvino_int8_compiles_once_into_the_checkpoints_cache(store):
    """The int8 graph compiles slowly: its compiled models are cached beside the artefacts and a restart
    loads them instead of compiling again; the fp32 engine (fast to compile, big blobs) is not cached."""
    from engines.openvino_rt import COMPILED_DIR

    home, tag = store
    man, folder = read_manifest(tag, home)
    compiled = cache_dir(folder, man) / COMPILED_DIR
    blobs = sorted(p.name for p in compiled.glob("*.blob"))
    assert blobs, "the int8 engine cached nothing"
    eng, _ = load_engine(tag, engine="openvino-int8", threads=2, home=str(home))
    assert eng.name == "openvino-int8"
    eng, _ = load_engine(tag, engine="openvino", threads=2, home=str(home))
    assert eng.name == "openvino"
    assert sorted(p.name for p in compiled.glob("*.blob")) == blobs  # reused, and fp32 added none


def test_openvino_compiles_without_a_cache_where_the_store_cannot_take_one(tmp_path):
    from engines.openvino_rt import _cache_lock

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with _cache_lock(blocker / "openvino-compiled") as cache:
        assert cache is None
    with _cache_lock(tmp_path / "ok") as cache:
        assert cache == tmp_path / "ok" and (tmp_path / "ok" / ".lock").is_file()


def test_a_perturbed_exported_model_is_refused_and_the_next_engine_serves(store, tmp_path, caplog):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from store.durable import record

    home, tag = store
    home = _copy_store(home, tmp_path)
    man, folder = read_manifest(tag, home)
    path = next(cache_dir(folder, man).rglob("model.onnx"))
    proto = onnx.load(str(path))
    biggest = max(proto.graph.initializer, key=lambda t: np.prod(t.dims))
    w = numpy_helper.to_array(biggest)
    biggest.CopyFrom(numpy_helper.from_array((w * 1.05).astype(w.dtype), biggest.name))  # a 5% error
    onnx.save(proto, str(path))
    record(path)  # a wrong export written whole (not a damaged file, which is exported again): verification's job

    with caplog.at_level(logging.WARNING, logger="engines"):
        eng, _ = load_engine(tag, engine="onnxruntime", threads=2, home=str(home))
    assert eng.name == "torch"  # onnxruntime -> torch: the fallback chain
    assert "differ by" in eng.refused["onnxruntime"]
    assert any("onnxruntime refused" in r.message and "differ by" in r.message for r in caplog.records)


def test_int8_is_refused_without_calibration_data(store, tmp_path):
    home, tag = store
    home = _copy_store(home, tmp_path)
    man, folder = read_manifest(tag, home)
    (folder / CALIBRATION_FILE).unlink()
    eng, _ = load_engine(tag, engine="onnxruntime-int8", threads=2, home=str(home))
    assert eng.name == "onnxruntime"
    assert "calibration" in eng.refused["onnxruntime-int8"]


def test_int8_is_calibrated_only_on_the_checkpoints_own_data():
    from engines.calibration import CalibrationSet

    x = torch.zeros(4, 3, RES, RES, dtype=torch.uint8)
    assert CalibrationSet(x, None, "checkpoint calibration set (calibration.safetensors, 4 images)").int8_problem() is None
    assert CalibrationSet(x, None, "generated from the fashion-mnist train split").int8_problem() is None
    assert "real calibration images" in CalibrationSet(x, None, "synthetic uint8 noise").int8_problem()
    stand_in = CalibrationSet(x, None, "generated: 256 random crops of 14 scikit-image photos (dataset 'imagenet' ...)")
    assert "own training data" in stand_in.int8_problem() and "save_calibration" in stand_in.int8_problem()


def test_auto_chooses_a_verified_engine_and_says_why(store):
    home, tag = store
    eng, _ = load_engine(tag, engine="auto", threads=2, home=str(home), batch_sizes=(1, 4), auto_seconds=0.5)
    d = eng.describe()
    assert d["engine"] in RUNNABLE + ["torch"] and d["verification"]["ok"]
    assert d["reason"].startswith("auto: fastest verified engine")
    assert set(d["timings_ms"]) >= {"torch", d["engine"]}
    assert d["timings_ms"][d["engine"]] == min(d["timings_ms"].values())
    for name, why in d.get("refused", {}).items():  # whatever was refused says why
        assert why, name


def test_unknown_engine_is_rejected(store):
    home, tag = store
    with pytest.raises(ValueError, match="unknown engine"):
        load_engine(tag, engine="tensorflow", home=str(home))


def test_export_cli_reports_every_engine(store, capsys):
    from cli.main import main

    home, tag = store
    names = RUNNABLE[:2]  # each engine is built again: two show the command's output
    assert main(["export", tag, "--engine", ",".join(names), "--home", str(home), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["engine"] for r in out["engines"]] == names and all(r["ok"] for r in out["engines"])
    assert out["calibration"].startswith("checkpoint calibration set")


# -- thread budget -------------------------------------------------------------------------------

@pytest.mark.parametrize("cores", [1, 2, 4, 16])
@pytest.mark.parametrize("workers", [1, 2, 3, 8])
@pytest.mark.parametrize("configured", [None, 1, 2, 8])
def test_threads_across_workers_never_exceed_the_cores(cores, workers, configured):
    t = worker_threads(workers, configured, cores=cores)
    assert t >= 1
    if workers <= cores:
        assert workers * t <= cores
    else:
        assert t == 1  # the least possible; a warning says to run fewer workers
    if configured and configured * workers <= cores:
        assert t == configured  # a configuration that fits is honoured


def test_derived_threads_use_all_cores_for_one_worker():
    assert worker_threads(1, cores=2) == 2 and worker_threads(2, cores=2) == 1


def test_every_runtime_gets_the_worker_thread_count(store):
    home, tag = store
    eng, _ = load_engine(tag, engine="onnxruntime", threads=1, home=str(home))
    assert torch.get_num_threads() == 1
    assert eng.session.get_session_options().intra_op_num_threads == 1
    if "openvino" in RUNNABLE:
        eng, _ = load_engine(tag, engine="openvino", threads=1, home=str(home))
        compiled = next(iter(eng.compiled.values()))
        assert int(compiled.get_property("INFERENCE_NUM_THREADS")) == 1
    torch.set_num_threads(2)


# -- pieces ---------------------------------------------------------------------------------------

def test_static_engines_pad_and_split_batches():
    calls = []

    def run(x, b):
        calls.append((len(x), b))
        return x.float().flatten(1)[:, :1]

    x = torch.arange(11, dtype=torch.uint8).view(11, 1, 1, 1)
    out = run_in_buckets(x, (1, 4), run)
    assert out.flatten().tolist() == list(range(11))
    assert calls == [(4, 4), (4, 4), (4, 4)]  # 4 + 4 + 3 padded to 4


@pytest.mark.skipif(not fashion_mnist.available(), reason="dataset-fashion-mnist is not installed")
def test_fashion_checkpoints_without_calibration_get_one_from_the_training_split(tmp_path):
    man = Manifest(variant="compact", config={}, num_classes=10, classes=[str(i) for i in range(10)],
                   dataset="fashion-mnist", resolution=RES, in_chans=3, grayscale=True)
    calib = load_calibration(tmp_path, man, cache=tmp_path / "cache")
    assert calib.real and "generated from the fashion-mnist train split" in calib.source
    assert calib.images.dtype == torch.uint8 and calib.images.shape == (256, 1, RES, RES)
    assert (tmp_path / "cache" / CALIBRATION_FILE).is_file()  # generated once, then cached
    again = load_calibration(tmp_path, man, cache=tmp_path / "cache")
    assert torch.equal(again.images, calib.images)


def test_imagenet_checkpoints_without_calibration_get_photo_crops(tmp_path):
    pytest.importorskip("skimage")
    man = Manifest(variant="lite0", config={}, num_classes=1000, classes=[], dataset="imagenet", resolution=RES)
    calib = load_calibration(tmp_path, man, cache=tmp_path / "cache")
    assert calib.real and "scikit-image photos" in calib.source
    assert calib.images.dtype == torch.uint8 and calib.images.shape == (256, 3, RES, RES)
    again = load_calibration(tmp_path, man, cache=tmp_path / "cache")  # a restart: same data, same words
    assert torch.equal(again.images, calib.images) and again.source == calib.source
    # a stand-in, not the checkpoint's own data: enough for the fp32 checks, not to calibrate int8
    assert again.stand_in and "own training data" in again.int8_problem()


def test_other_datasets_without_calibration_fall_back_to_noise_and_say_so(tmp_path):
    man = Manifest(variant="compact", config={}, num_classes=4, classes=list("abcd"), dataset="fake", resolution=RES)
    calib = load_calibration(tmp_path, man, cache=tmp_path / "cache")
    assert not calib.real and "not available offline" in calib.source


def test_bench_rows_name_their_engine_and_precision(capsys):
    """`effnet bench` rows gain engine/precision; the eager reference is torch/fp32. (The exported
    engines' rows come from `effnet bench --engines`, not run here: each model costs an export.)"""
    from cli.main import main

    argv = ["bench", "--json", "--models", "compact", "--batches", "1", "--resolution", "32",
            "--rounds", "1", "--seconds", "0.01"]
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["engine"], r["precision"]) for r in rows] == [("torch", "fp32")]
    from engines.bench import select_engines, skipped_engines

    assert set(select_engines("all")) | set(skipped_engines()) == set(ENGINES)
    with pytest.raises(KeyError, match="unknown engine"):
        select_engines("torch,tensorrt-fp4")


def test_gpu_only_engines_are_skipped_on_the_cpu_and_recorded(tmp_path):
    """An engine that cannot run on the device (here torch-fp16 on the CPU) is left out of the bench
    with its reason recorded, and the rest of the run still happens."""
    from engines.bench import run_engine_bench, select_engines, skipped_engines

    assert "torch-fp16" not in select_engines("all", "cpu")
    assert "fp16" in skipped_engines("cpu")["torch-fp16"]
    failed: dict[str, str] = {}
    rows = run_engine_bench(["compact"], ["torch", "torch-fp16"], [1], resolution=32, rounds=1, seconds=0.01,
                            device="cpu", failed=failed)
    assert [r["engine"] for r in rows] == ["torch"]
    assert failed["compact/torch-fp16"].startswith("unavailable: fp16 eager is a GPU engine")


def test_auto_considers_gpu_engines_on_a_gpu_and_cpu_engines_on_the_cpu():
    from engines.base import gpu_buckets
    from engines.loader import AUTO_CANDIDATES, auto_candidates

    assert auto_candidates("cpu") == AUTO_CANDIDATES
    gpu = auto_candidates("cuda")
    assert gpu[0] == "torch-compile" and gpu[-1] == "torch"
    assert not [n for n in gpu if n.startswith("openvino") or n.endswith("int8")]
    for n in gpu:  # every GPU candidate says it can run on cuda (given its library)
        why = ENGINES[n].unavailable("cuda")
        assert why is None or "onnxruntime" in why, (n, why)
    # Eager engines pad to static batch sizes on a GPU only (cuDNN's per-shape cost, see engines/base.py).
    assert gpu_buckets(torch.device("cpu"), (1, 8, 32)) == ()


def test_auto_times_the_candidates_interleaved_and_a_passing_disturbance_does_not_decide():
    """A is the faster engine but is disturbed during the first slice it gets (another process waking
    up); timed one after the other it would look slower than B. Interleaved rounds, each keeping its
    fastest, still pick A. Sleeps stand in for inference: only their order and ratio matter."""
    import time
    from types import SimpleNamespace

    from engines.loader import time_engines

    calls = []

    def engine(name, seconds):
        def run(x):
            disturbed = name == "A" and len(calls) >= 4 and "B" not in calls[4:]  # A's first timed slice
            calls.append(name)
            time.sleep((0.02 if disturbed else seconds) * len(x))
        return run

    t = time_engines({"A": engine("A", 0.002), "B": engine("B", 0.004)}, (1, 2), SimpleNamespace(resolution=4),
                     seconds=0.3, rounds=3)
    assert t["A"] < t["B"]
    timed = calls[4:]  # after one warm-up call per engine and batch size
    switches = sum(a != b for a, b in zip(timed, timed[1:]))
    assert switches >= 3 * 2 * 2 - 1  # every (round, batch size) visits A then B


def test_auto_records_its_choice_and_a_restart_builds_only_the_winner(store, monkeypatch):
    """A restart with nothing changed reuses auto's choice (still verified) instead of timing every
    candidate; a changed key (other batch sizes) times them again."""
    import engines.loader as loader

    from engines.loader import recorded_choice

    home, tag = store
    assert recorded_choice(tag, threads=1, home=str(home), batch_sizes=(1, 2)) is None
    first, _ = load_engine(tag, engine="auto", threads=1, home=str(home), batch_sizes=(1, 2), auto_seconds=0.3)
    # What a worker asks before loading, to know whether it needs the machine to itself (no timing: no).
    assert recorded_choice(tag, threads=1, home=str(home), batch_sizes=(2, 1)) == first.name
    assert recorded_choice(tag, threads=2, home=str(home), batch_sizes=(1, 2)) is None
    assert recorded_choice(tag, threads=1, home=str(home), batch_sizes=(1, 3)) is None
    built = []
    real_try = loader._try
    monkeypatch.setattr(loader, "_try", lambda name, ck: (built.append(name), real_try(name, ck))[1])
    monkeypatch.setattr(loader, "time_engines", lambda *a, **k: pytest.fail("a recorded choice must not be timed"))
    again, _ = load_engine(tag, engine="auto", threads=1, home=str(home), batch_sizes=(1, 2), auto_seconds=0.3)
    assert again.name == first.name and built == [first.name]
    assert again.describe()["reason"].startswith("auto: recorded choice") and again.describe()["verification"]["ok"]
    with pytest.raises(pytest.fail.Exception, match="must not be timed"):  # other batch sizes: another key
        load_engine(tag, engine="auto", threads=1, home=str(home), batch_sizes=(1, 3), auto_seconds=0.3)


def test_auto_keeps_one_choice_per_thread_count(store, monkeypatch):
    """A CPU worker loads an engine for 1 thread and one for all (service.cpu_slots): both choices are
    kept, so a restart times neither."""
    import engines.loader as loader

    home, tag = store
    for threads in (1, 2):
        load_engine(tag, engine="auto", threads=threads, home=str(home), batch_sizes=(1, 2), auto_seconds=0.3)
    monkeypatch.setattr(loader, "time_engines", lambda *a, **k: pytest.fail("a recorded choice must not be timed"))
    for threads in (1, 2):
        again, _ = load_engine(tag, engine="auto", threads=threads, home=str(home), batch_sizes=(1, 2))
        assert again.describe()["reason"].startswith("auto: recorded choice")


def test_the_test_set_is_named_without_loading_it_and_loaded_only_when_needed(monkeypatch):
    """A restart's recorded verdicts are keyed by the test set's name: naming it must not read 10,000
    images, and the name must be the one the loaded set carries."""
    import types

    import engines.calibration as calibration
    from engines.verify import Reference

    fashion = types.SimpleNamespace(dataset="fashion-mnist", resolution=32, resize=None)
    imagenet = types.SimpleNamespace(dataset="imagenet", resolution=32, resize=None)
    assert calibration.test_set_source(imagenet) is None and calibration.load_test_set(imagenet) is None
    if not fashion_mnist.available():
        assert calibration.test_set_source(fashion) is None
        pytest.skip("Fashion-MNIST is not installed (Debian package dataset-fashion-mnist)")
    loaded = calibration.load_test_set(fashion)
    assert calibration.test_set_source(fashion) == loaded.source and len(loaded.images) == 10_000
    calls = []
    ref = Reference(None, None, lambda: calls.append(1) or loaded, calibration.test_set_source(fashion))
    assert ref.test_source == loaded.source and not calls
    assert ref.test is loaded and ref.test is loaded and calls == [1]  # loaded once, on first use
