"""Worker processes and in-gateway streams (service.workers, service.inprocess), without a server."""
import asyncio
from dataclasses import replace

import numpy as np
import pytest

from service.config import parse_config
from tests.service.fakes import CFG


def test_workers_load_side_by_side_unless_auto_must_time(monkeypatch):
    """One core slot per load where nothing is timed; every slot where `auto` times its candidates."""
    import contextlib

    import engines.loader
    from service.workers import loading_slots

    class Slots:
        def hold(self, most):
            return f"hold({most})"

        def hold_all(self):
            return "hold_all"

    cfg = parse_config(CFG)
    recorded = {"b0": "openvino", "mec": None}
    monkeypatch.setattr(engines.loader, "recorded_choice", lambda tag, **kw: recorded[tag.split(":")[0]])
    auto = lambda name: replace(cfg.variants[name], engine="auto")  # noqa: E731
    assert loading_slots(Slots(), auto("b0"), "cpu", (1, 8), 2) == "hold(1)"
    assert loading_slots(Slots(), auto("mec"), "cpu", (1, 8), 2) == "hold_all"
    assert loading_slots(Slots(), replace(auto("mec"), engine="onnxruntime"), "cpu", (1, 8), 2) == "hold(1)"
    assert isinstance(loading_slots(None, auto("mec"), "cuda", (1, 8), 2), contextlib.nullcontext)


def test_gpu_engine_calls_all_run_on_one_thread_cpu_calls_in_place():
    """cuDNN's benchmarked plans are cached per thread in PyTorch: a GPU worker's warm-up only counts if
    its requests run on the same thread (the H200 stalls). Called here from many threads, as BentoML does."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from service.workers import DeviceThread

    on_gpu, on_cpu = DeviceThread("cuda"), DeviceThread("cpu")
    with ThreadPoolExecutor(8) as callers:
        gpu_threads = set(callers.map(lambda _: on_gpu(threading.get_ident), range(64)))
        pairs = list(callers.map(lambda _: (threading.get_ident(), on_cpu(threading.get_ident)), range(64)))
    assert len(gpu_threads) == 1 and threading.get_ident() not in gpu_threads
    assert all(caller == ran for caller, ran in pairs)
    assert on_gpu(lambda a, b=0: a + b, 2, b=3) == 5
    with pytest.raises(ZeroDivisionError):  # an engine's error reaches the request, as before
        on_gpu(lambda: 1 / 0)


def test_response_media_types_are_worked_out_once_and_stay_what_bentoml_says():
    """service.workers.cache_media_types: the same answers as BentoML's own, without a JSON schema
    built per response."""
    import bentoml

    from service.workers import cache_media_types

    @bentoml.service
    class Kinds:
        @bentoml.api
        def array(self, x: np.ndarray) -> np.ndarray:
            return x

        @bentoml.api
        def text(self, x: str) -> str:
            return x

        @bentoml.api
        def mapping(self, x: int) -> dict:
            return {}

    assert cache_media_types() and cache_media_types()  # applied once, and idempotent
    specs = [Kinds.apis[n].output_spec for n in ("array", "text", "mapping")]
    assert [s.mime_type() for s in specs] == ["application/json", "text/plain", "application/json"]
    built = []
    real = specs[0].model_json_schema
    specs[0].model_json_schema = classmethod(lambda cls, *a, **k: built.append(1) or real(*a, **k))
    try:
        assert specs[0].mime_type() == "application/json" and built == []
    finally:
        specs[0].model_json_schema = real


def test_the_workers_batcher_does_not_hold_requests_back_by_a_learned_wait():
    """After a burst BentoML's batcher had learned to wait ~100 ms for batch-mates and kept doing so
    for lone requests (service.workers.dispatch_without_learned_wait). Its per-item time estimates,
    which the 503 load shedding uses, are still learned."""
    from bentoml._internal.marshal.dispatcher import Optimizer

    from service.workers import dispatch_without_learned_wait

    assert dispatch_without_learned_wait()
    opt = Optimizer(max_latency=10.0)
    for n in (1, 2, 4, 8) * 5:
        opt.log_outbound(n=n, wait=0.1, duration=0.01 * n + 0.002)  # a burst: every batch waited 100 ms
    opt.trigger_refresh()
    assert opt.wait == 0
    assert opt.o_a == pytest.approx(0.01, rel=0.05) and opt.o_b == pytest.approx(0.002, abs=0.001)


def test_a_variant_is_ready_once_the_processes_it_runs_have_loaded_not_its_workers_setting():
    """On a GPU one process holds the device whatever `workers` says; readiness must count that one,
    or a `gpu: 1, workers: 2` variant (lite0 in service/config.yaml) never gets ready."""
    from service.config import VariantConfig
    from service.workers import VariantRunner, worker_names

    v = VariantConfig("l_x", "l:latest", gpu=1, workers=2)
    assert worker_names(v, gpu_present=True) == ["effnet-worker-l-x"]
    assert worker_names(v, gpu_present=False) == ["effnet-worker-l-x-1", "effnet-worker-l-x-2"]
    runner = object.__new__(VariantRunner)  # no engines loaded: only the status is under test
    runner.v, runner.error, runner.device, runner.engine = v, None, "cuda", None
    one = runner.status(2, 1, 1)
    assert one["ready"] and one["workers"] == 1 and one["error"] is None
    runner.error = "variant 'l_x', checkpoint 'l:latest': sha256 mismatch"
    failed = runner.status(2, 0, 1)
    assert not failed["ready"] and failed["error"] == runner.error


def test_a_variant_in_the_gateway_loads_in_a_thread_and_answers_503_until_it_has(monkeypatch):
    """`placement: gateway` must not hold the gateway's start-up (and /livez) while its engines load."""
    import threading

    from service import inprocess
    from service.config import VariantConfig

    release = threading.Event()
    built = []

    class SlowRunner:  # stands in for VariantRunner: loading an engine takes until `release`
        def __init__(self, v, cfg, use_gpu):
            assert release.wait(10)
            self.error = None if len(built) < 1 else "variant 'a', checkpoint 'a:latest': sha256 mismatch"
            built.append(self)

        def status(self, threads, loaded, wanted, placement):
            return {"ready": self.error is None and loaded >= wanted, "error": self.error, "placement": placement}

        def run(self, batch):
            raise AssertionError("a variant that is not loaded runs nothing")

    monkeypatch.setattr(inprocess, "VariantRunner", SlowRunner)
    cfg = parse_config(CFG)
    local = inprocess.InProcessVariant(VariantConfig("a", "a:latest", workers=2, placement="gateway"), cfg, False)
    # constructed at once, while the first runner still loads
    st = local.status()
    assert not st["ready"] and "loading in the gateway process (0 of 2 streams loaded)" in st["error"]
    from bentoml.exceptions import ServiceUnavailable

    with pytest.raises(ServiceUnavailable, match="loading"):
        asyncio.run(local.predict(np.zeros((1, 3, 8, 8), np.uint8)))
    release.set()
    local._loader.join(10)
    # the second stream's checkpoint failed: not ready, with that reason, not "loading"
    st = local.status()
    assert not st["ready"] and "sha256 mismatch" in st["error"] and not local.loaded


def test_a_gateway_variant_that_loaded_serves_from_its_streams(monkeypatch):
    from service import inprocess
    from service.config import VariantConfig

    class Runner:
        def __init__(self, v, cfg, use_gpu):
            self.error = None

        def status(self, threads, loaded, wanted, placement):
            return {"ready": loaded >= wanted, "error": None, "workers_loaded": loaded}

        def run(self, batch):
            from service.results import InferenceResult

            return InferenceResult(np.ones((len(batch), 3), np.float32), 0.01, engine="torch")

    monkeypatch.setattr(inprocess, "VariantRunner", Runner)
    local = inprocess.InProcessVariant(VariantConfig("a", "a:latest", workers=2, placement="gateway"),
                                       parse_config(CFG), False)
    local._loader.join(10)
    assert local.loaded and local.status() == {"ready": True, "error": None, "workers_loaded": 2}
    result = asyncio.run(local.predict(np.zeros((2, 3, 8, 8), np.uint8)))
    assert result.scores.shape == (2, 3) and (result.engine, result.replica) == ("torch", "in_process")
