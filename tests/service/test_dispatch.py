"""Gateway -> worker calls (service.dispatch): coalescing, replicas, retries, transport, errors.

The worker is a stand-in: bentoml 1.4.30, which we pin, does not drop calls on its own."""
import asyncio
import os
import types
from dataclasses import replace

import numpy as np
import pytest

from service.config import parse_config
from service.results import InferenceResult
from tests.service.fakes import CFG, FlakyWorker, TimedWorker, dispatcher_with


def test_batches_reach_workers_through_shared_memory_unless_told_otherwise():
    worker = FlakyWorker(drops=0)
    d = dispatcher_with(worker)
    result = asyncio.run(d.infer("b0", np.zeros((2, 3, 8, 8), np.uint8)))
    assert result.scores.shape == (2, 3) and worker.shared == 1 and d.transport("b0") == "shared_memory"
    assert len(d.arenas["b0"].free) == d.arenas["b0"].slots  # every slot given back
    cfg = parse_config(CFG)
    http = dispatcher_with(worker, cfg=replace(cfg, server=replace(cfg.server, worker_transport="http")))
    asyncio.run(http.infer("b0", np.zeros((2, 3, 8, 8), np.uint8)))
    assert worker.shared == 1 and worker.calls == 2 and http.transport("b0") == "http"


def test_a_worker_that_cannot_map_shared_memory_gets_the_pixels_instead():
    """On another host (or container) the worker answers 404 for the arena: the gateway sends that call
    again in the body, and every later one, and says so in /variants."""
    from bentoml.exceptions import NotFound

    class Remote(FlakyWorker):
        async def predict_shared(self, refs):
            raise NotFound("shared-memory batch ... is not on this host")

    worker = Remote(drops=0)
    d = dispatcher_with(worker)
    for _ in range(2):
        assert asyncio.run(d.infer("b0", np.zeros((1, 3, 8, 8), np.uint8))).scores[0, 1] == 1.0
    assert worker.calls == 2 and d.arenas["b0"] is None and d.transport("b0") == "http"


def test_no_shared_memory_means_batches_in_the_body(monkeypatch):
    monkeypatch.delattr(os, "memfd_create")  # a system without it
    worker = FlakyWorker(drops=0)
    d = dispatcher_with(worker)
    result = asyncio.run(d.infer("b0", np.zeros((1, 3, 8, 8), np.uint8)))
    assert result.scores[0, 1] == 1.0 and worker.calls == 1 and d.transport("b0") == "http"


@pytest.mark.parametrize("drop", ["aiohttp", "aiohttp-disconnected", "aiohttp-reset", "httpx"])
def test_a_dropped_worker_connection_is_retried(drop):
    worker = FlakyWorker(drops=2, drop=drop)
    result = asyncio.run(dispatcher_with(worker).infer("b0", np.zeros((2, 3, 8, 8), np.uint8)))
    assert worker.calls == 3 and result.scores.shape == (2, 3) and result.scores[0, 1] == 1.0 and result.waited >= 0


def test_calls_are_spread_over_a_variants_worker_processes():
    """Each worker process is its own service (service.workers.worker_names): the gateway, not the
    kernel's choice of which process accepts a pooled connection, decides where a call goes."""
    a, b = TimedWorker(0.05), TimedWorker(0.05)
    cfg = parse_config(CFG)
    cfg.variants["b0"] = replace(cfg.variants["b0"], calls_in_flight=4)
    gw = dispatcher_with(a, b, cfg=cfg)

    async def burst():
        return await asyncio.gather(*(gw.infer("b0", np.zeros((1, 3, 8, 8), np.uint8)) for _ in range(12)))

    assert len(asyncio.run(burst())) == 12
    assert a.most == b.most == 2 and a.calls + b.calls >= 4  # never 3 on one while the other had 1
    assert gw.replica_calls["b0"] == [0, 0]  # every call given back
    lone = TimedWorker(0.0), TimedWorker(0.0)
    gw = dispatcher_with(*lone)
    for _ in range(3):
        asyncio.run(gw.infer("b0", np.zeros((1, 3, 8, 8), np.uint8)))
    assert [w.calls for w in lone] == [3, 0]  # one request at a time meets the same, warm, process


def test_a_dropped_connection_is_retried_on_another_worker_process():
    """A replica that is gone (killed, restarting) is not asked again for the same call while another
    can answer: the retry goes to the next one."""
    dead, alive = FlakyWorker(drops=99), FlakyWorker(drops=0)
    result = asyncio.run(dispatcher_with(dead, alive).infer("b0", np.zeros((1, 3, 8, 8), np.uint8)))
    assert (dead.calls, alive.calls) == (1, 1) and result.scores[0, 1] == 1.0 and result.replica == "worker 2"


def test_a_failed_call_gives_its_replica_slot_back():
    gw = dispatcher_with(FlakyWorker(0, RuntimeError("boom")), FlakyWorker(0))
    with pytest.raises(RuntimeError):
        asyncio.run(gw.infer("b0", np.zeros((1, 3, 8, 8), np.uint8)))
    assert gw.replica_calls["b0"] == [0, 0]


@pytest.mark.parametrize("endpoint", ["classify", "classify_batch"])
def test_an_unexpected_fault_is_answered_500_with_the_request_id(endpoint):
    """Not left to the ASGI server, which would drop the client's connection and skip the metrics."""
    import io
    import json as _json

    from starlette.datastructures import FormData, UploadFile

    from service import metrics

    from service.admission import Admission
    from service.gateway import GatewayService

    gw = object.__new__(GatewayService)  # no server: only the request path is under test
    gw.cfg = parse_config(CFG)
    gw.dispatcher = dispatcher_with(FlakyWorker(0, RuntimeError("a bug of ours")), cfg=gw.cfg)
    gw.admission = Admission.from_config(gw.cfg)
    a = types.SimpleNamespace(route="fashion", variant="b0", how="explicit", shadow=None)
    field = "image" if endpoint == "classify" else "images"
    form = FormData([(field, UploadFile(io.BytesIO(b"png"), filename="x.png"))])

    async def route(request, allowed):
        return form, a, 5

    async def prepare(data, variant):
        return np.zeros((1, 3, 8, 8), np.uint8)

    gw._route, gw.decoder = route, types.SimpleNamespace(prepare=prepare)
    counted = metrics.REQUESTS.labels(endpoint, "fashion", "b0", "500")
    before = counted._value.get()
    resp = asyncio.run(getattr(gw, endpoint)(object()))
    body = _json.loads(resp.body)
    assert resp.status_code == 500 and "RuntimeError" in body["error"]
    assert body["request_id"] == resp.headers["x-request-id"] and body["request_id"] in body["error"]
    assert counted._value.get() == before + 1


def test_concurrent_requests_for_a_variant_share_worker_calls():
    """Beyond the variant's calls in flight (2 for one worker process), waiting requests go as one call."""
    class SlowWorker(FlakyWorker):
        sizes: list = []

        async def predict(self, batch):
            self.sizes.append(len(batch))
            await asyncio.sleep(0.05)
            return await super().predict(batch)

    async def go():
        worker = SlowWorker(drops=0)
        d = dispatcher_with(worker)
        return worker, await asyncio.gather(*(d.infer("b0", np.zeros((1, 3, 8, 8), np.uint8)) for _ in range(10)))

    worker, results = asyncio.run(go())
    assert SlowWorker.sizes == [1, 1, 8] and worker.calls == 3
    assert all(r.scores.shape == (1, 3) and r.scores[0, 1] == 1.0 and r.waited >= 0 for r in results)


def test_worker_errors_become_502_or_503_with_retry_after():
    from bentoml.exceptions import InternalServerError, ServiceUnavailable

    from service.errors import ClientError

    with pytest.raises(ClientError) as e:
        asyncio.run(dispatcher_with(FlakyWorker(drops=5)).infer("b0", np.zeros((1, 3, 8, 8), np.uint8)))
    assert e.value.status == 502
    with pytest.raises(ClientError) as e:
        asyncio.run(dispatcher_with(FlakyWorker(0, ServiceUnavailable("busy"))).infer("b0", np.zeros((1, 3, 8, 8), np.uint8)))
    assert e.value.status == 503 and e.value.headers["Retry-After"] == "1"
    with pytest.raises(ClientError) as e:
        asyncio.run(dispatcher_with(FlakyWorker(0, InternalServerError("boom"))).infer("b0", np.zeros((1, 3, 8, 8), np.uint8)))
    assert e.value.status == 502
    # aiohttp's total timeout (bentoml 1.4.30's client) and its socket timeout: 503, not a 500
    import aiohttp

    for timeout in (asyncio.TimeoutError(), aiohttp.ServerTimeoutError("read timed out")):
        with pytest.raises(ClientError) as e:
            asyncio.run(dispatcher_with(FlakyWorker(0, timeout)).infer("b0", np.zeros((1, 3, 8, 8), np.uint8)))
        assert e.value.status == 503 and e.value.headers["Retry-After"] == "1"


def test_a_worker_answers_a_typed_result_that_survives_bentomls_batching_and_pickling():
    """One record per image: BentoML's batcher splits the answer among the calls it merged, and the
    pickle serde between services keeps every field; the gateway gets scores, seconds, engine, replica."""
    from _bentoml_impl.serde import PickleSerde
    from bentoml._internal.runner.container import AutoContainer

    from service.workers import make_worker

    scores = np.random.default_rng(0).random((5, 10), dtype=np.float32)
    records = InferenceResult(scores, 0.25, engine="openvino").to_records()
    mine = AutoContainer.batch_to_batches(records, [0, 2, 5], 0)[1]  # this call's images: 2..4
    spec = make_worker(parse_config(CFG).variants["b0"], parse_config(CFG), False, "effnet-worker-b0")
    out = spec.apis["predict"].output_spec
    serde = PickleSerde()
    received = serde.deserialize_model(serde.serialize_model(out(mine)), out).root
    result = InferenceResult.from_records(received, replica="worker 1")
    assert np.array_equal(result.scores, scores[2:]) and result.seconds == 0.25
    assert (result.engine, result.replica, result.waited) == ("openvino", "worker 1", 0.0)


def test_a_variant_in_the_gateway_answers_with_its_own_result():
    class Local:
        loaded = True

        async def predict(self, batch):
            return InferenceResult(np.ones((len(batch), 3), np.float32), 0.01, "torch", "in_process")

    from service.dispatch import Dispatcher

    d = Dispatcher(parse_config(CFG), lambda v: [], {"b0": Local()}, {})
    result = asyncio.run(d.infer("b0", np.zeros((2, 3, 8, 8), np.uint8)))
    assert result.scores.shape == (2, 3) and result.replica == "in_process" and d.transport("b0") == "in_process"
