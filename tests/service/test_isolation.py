"""A fault or a burst in one variant stays in that variant: admission per variant, call deadlines, replica
marks and their probe back, readiness that follows them, and a route's fallback (service.admission,
service.health, service.dispatch, service.readiness, service.routing). Stand-in workers, no server;
the real-server run is test_worker_faults.py."""
import asyncio
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest

from service.admission import Admission
from service.config import ConfigError, check_label_spaces, parse_config
from service.errors import ClientError
from service.health import DOWN, UP, Health, pid_namespace
from service.readiness import Readiness
from service.routing import Router
from tests.service.fakes import CFG, FlakyWorker, dispatcher_with

BATCH = np.zeros((1, 3, 8, 8), np.uint8)


# admission ----------------------------------------------------------------------------------------------

def test_a_variant_past_its_places_and_its_share_of_the_pool_does_not_refuse_another_route():
    adm = Admission({"b0": 2, "lite0": 2}, burst=4, share=0.5, retry_after_s=3)
    for _ in range(4):  # two of its own, two borrowed: half the pool
        adm.admit("b0")
    with pytest.raises(ClientError) as e:
        adm.admit("b0")
    assert e.value.status == 429 and e.value.headers["Retry-After"] == "3"
    assert "variant 'b0' is overloaded" in str(e.value) and "retry later" in str(e.value)
    for _ in range(4):  # the other variant still has its own places and the rest of the pool
        adm.admit("lite0")
    assert (adm.held("b0"), adm.held("lite0"), adm.pool_used) == (4, 4, 4)
    adm.release("b0")
    assert adm.pool_used == 3 and adm.borrowed["b0"] == 1  # a borrowed place goes back first


def test_a_place_is_given_back_whatever_the_request_ends_with():
    adm = Admission({"b0": 1}, burst=0, share=0.5, retry_after_s=1)
    with pytest.raises(RuntimeError), adm.hold("b0"):
        raise RuntimeError("the request failed")
    with adm.hold("b0"), pytest.raises(ClientError, match="its 1 places"):
        adm.admit("b0")
    assert adm.held("b0") == 0


def test_places_follow_each_variants_calls_and_batches_and_the_backstop_sits_above_them():
    cfg = parse_config({**CFG, "variants": {**CFG["variants"], "lite0": {"model": "l:latest", "workers": 1,
                                                                         "max_batch_size": 8},
                                            "mec": {"model": "m:latest", "max_inflight": 5}}})
    assert cfg.variants["b0"].resolved_max_inflight == 2 * 32  # two calls of 32 images
    assert cfg.variants["lite0"].resolved_max_inflight == 2 * 8 and cfg.variants["mec"].resolved_max_inflight == 5
    assert cfg.server.max_inflight == 64 + 5 + 64 + 16 + cfg.server.burst_inflight
    assert parse_config({**CFG, "server": {"max_inflight": 10}}).server.max_inflight == 10
    with pytest.raises(ConfigError, match="burst_share: expected 0..1"):
        parse_config({**CFG, "server": {"burst_share": 2}})


# deadlines and replica marks ------------------------------------------------------------------------------

class HangingWorker(FlakyWorker):
    """Accepts the call and never answers, as a stopped process behind its open socket does."""

    async def predict(self, batch):
        self.calls += 1
        await asyncio.sleep(3600)


def fast_cfg(latency_ms=100):
    return parse_config({**CFG, "variants": {**CFG["variants"], "b0": {"model": "b0:latest",
                                                                       "max_latency_ms": latency_ms}}})


def test_a_hanging_worker_is_answered_503_at_its_deadline_and_then_at_once():
    cfg = fast_cfg(100)  # the call's deadline: 0.1 s + 1 s
    d = dispatcher_with(HangingWorker(0), cfg=cfg)

    async def go():
        t0 = time.monotonic()
        with pytest.raises(ClientError) as e:
            await d.infer("b0", BATCH)
        first = time.monotonic() - t0
        t0 = time.monotonic()
        with pytest.raises(ClientError) as again:
            await d.infer("b0", BATCH)
        return e.value, first, again.value, time.monotonic() - t0

    e, first, again, second = asyncio.run(go())
    assert e.status == 503 and e.headers["Retry-After"] == "1" and "deadline of 1.1 s" in str(e)
    assert 1.0 < first < 2.0
    assert d.health.is_down("b0") and again.status == 503 and second < 0.1
    assert "variant 'b0' is down: a call took longer than its deadline" in str(again)


def test_a_replica_marked_down_ends_its_calls_in_flight_and_the_next_go_to_the_other():
    hung, alive = HangingWorker(0), FlakyWorker(0)
    d = dispatcher_with(hung, alive, cfg=fast_cfg(60_000))

    async def go():
        call = asyncio.ensure_future(d.infer("b0", BATCH))
        await asyncio.sleep(0.05)  # the call waits on replica 1 (the first among equals)
        t0 = time.monotonic()
        d.health.mark_down("b0", 0, "exited", "its worker process 1234 exited")
        result = await call  # retried on replica 2 at once, not after the 61 s deadline
        return result, time.monotonic() - t0

    result, waited = asyncio.run(go())
    assert result.replica == "worker 2" and waited < 0.5 and hung.calls == 1 and alive.calls == 1
    assert d.health.usable("b0") == [1]


def test_a_variant_whose_only_replica_goes_down_mid_call_answers_503_at_once():
    d = dispatcher_with(HangingWorker(0), cfg=fast_cfg(60_000))

    async def go():
        call = asyncio.ensure_future(d.infer("b0", BATCH))
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        d.health.mark_down("b0", 0, "exited", "its worker process 1234 exited")
        with pytest.raises(ClientError) as e:
            await call
        return e.value, time.monotonic() - t0

    e, waited = asyncio.run(go())
    assert e.status == 503 and waited < 0.1 and "variant 'b0' is down: its worker process 1234 exited" in str(e)


def test_a_connection_that_cannot_be_made_marks_the_replica_down():
    import aiohttp

    refused = aiohttp.ClientConnectorError(types_key(), OSError(111, "Connection refused"))
    d = dispatcher_with(FlakyWorker(0, refused))
    with pytest.raises(ClientError) as e:
        asyncio.run(d.infer("b0", BATCH))
    assert e.value.status == 503 and d.health.is_down("b0") and "its connection failed" in str(e.value)


def types_key():
    import types

    return types.SimpleNamespace(ssl=None, host="127.0.0.1", port=3000)


def test_a_replica_is_marked_down_when_it_stops_answering_and_up_when_it_answers_again():
    answers = {"b0": [{"ready": True}, TimeoutError(), ConnectionResetError(), {"ready": True}]}

    async def check(variant, i):
        a = answers[variant].pop(0)
        if isinstance(a, Exception):
            raise a
        return a

    async def go():
        h = Health({"b0": 1}, check, interval_s=0.01, timeout_s=0.5)
        states = []
        for _ in range(4):
            await h.check("b0", 0)
            states.append((h.replicas["b0"][0].state, h.replicas["b0"][0].reason))
        return states

    states = asyncio.run(go())
    assert [s for s, _ in states] == [UP, DOWN, DOWN, UP]
    assert "did not answer its health check within 0.5 s" in states[1][1]


def test_a_check_that_hangs_marks_the_replica_down_within_its_timeout():
    async def check(variant, i):
        await asyncio.sleep(3600)

    async def go():
        h = Health({"b0": 1}, check, timeout_s=0.2)
        await asyncio.wait_for(h.check("b0", 0), 30)  # the check itself never waits the hour out
        return h

    h = asyncio.run(go())
    assert h.is_down("b0") and "not answering yet (starting)" in h.replicas["b0"][0].reason


def test_a_replica_that_answers_calls_is_busy_not_hung_when_its_check_is_slow():
    async def check(variant, i):
        await asyncio.sleep(3600)

    async def go():
        h = Health({"b0": 1}, check, timeout_s=0.2)
        h.record("b0", 0, {"ready": True})

        async def answer_a_call():
            await asyncio.sleep(0.05)
            h.replicas["b0"][0].called_at = time.monotonic()

        await asyncio.gather(h.check("b0", 0), answer_a_call())
        busy = h.is_down("b0")
        await h.check("b0", 0)  # no call answered since: hung
        return busy, h.is_down("b0")

    assert asyncio.run(go()) == (False, True)


def test_a_worker_process_that_exits_is_marked_down_at_once():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])

    async def go():
        h = Health({"b0": 1}, None)
        h.record("b0", 0, {"ready": True, "pid": proc.pid, "pid_namespace": pid_namespace()})
        assert h.replicas["b0"][0].pid == proc.pid
        proc.kill()
        deadline = time.monotonic() + 2
        while not h.is_down("b0") and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return h

    try:
        h = asyncio.run(go())
    finally:
        proc.kill()
        proc.wait()
    assert h.is_down("b0") and f"its worker process {proc.pid} exited" in h.replicas["b0"][0].reason


# readiness ------------------------------------------------------------------------------------------------

ROUTES = {**CFG, "routes": {"fashion": {"split": {"b0": 1}, "fallback": "compact"},
                            "other": {"split": {"compact": 1, "mec": 1}},
                            "imagenet": {"split": {"lite0": 1}}}}


def marked(policy, down=(), workers=None):
    cfg = parse_config({**ROUTES, "server": {"readiness": policy}})
    h = Health({v: 1 for v in cfg.variants}, None)
    for v in cfg.variants:
        h.record(v, 0, {"ready": True, "variant": v})
    for v in down:
        h.mark_down(v, 0, "exited", "its worker process 1 exited")
    return Readiness(cfg, h, {}), h


def test_readiness_follows_the_marks_and_does_not_latch():
    r, h = marked("all")
    assert r.refresh() == [] and r.ready
    h.mark_down("b0", 0, "exited", "its worker process 1 exited")
    reasons = r.refresh()
    assert not r.ready and len(reasons) == 1 and "variant 'b0' is down: its worker process 1 exited" in reasons[0]
    assert r.variant("b0")["ready"] is False and r.variant("b0")["replicas"][0]["state"] == "down"
    assert r.variant("mec")["ready"] is True
    h.record("b0", 0, {"ready": True})
    assert r.refresh() == [] and r.ready


def test_the_routes_policy_is_ready_while_every_route_has_a_variant_that_serves():
    r, _ = marked("routes", down=["b0"])  # fashion is served by its fallback
    assert r.refresh() == []
    r, _ = marked("routes", down=["mec"])  # other still has compact
    assert r.refresh() == []
    r, _ = marked("routes", down=["lite0"])
    reasons = r.refresh()
    assert len(reasons) == 1 and reasons[0].startswith("route 'imagenet' has no variant that serves: variant 'lite0' "
                                                       "is down: its worker process 1 exited")
    r, _ = marked("all", down=["mec"])
    assert len(r.refresh()) == 1


def test_a_start_is_ready_once_every_replica_has_loaded_and_stays_so_while_one_serves():
    cfg = parse_config(CFG)
    h = Health({v: 2 if v == "lite0" else 1 for v in cfg.variants}, None)
    for v in cfg.variants:
        h.record(v, 0, {"ready": True})
    r = Readiness(cfg, h, {})
    assert r.refresh() == ["variant 'lite0': 1 of 2 worker processes loaded"]
    h.record("lite0", 1, {"ready": True})
    assert r.refresh() == []
    h.mark_down("lite0", 1, "exited", "its worker process 2 exited")
    assert r.refresh() == [] and r.status["lite0"]["workers_loaded"] == 1


def test_a_broken_checkpoint_is_the_reason_and_no_check_waits():
    cfg = parse_config(CFG)
    h = Health({v: 1 for v in cfg.variants}, None)
    for v in cfg.variants:
        h.record(v, 0, {"ready": v != "mec", "error": "variant 'mec', checkpoint 'm': sha256 mismatch" if v == "mec" else None})
    r = Readiness(cfg, h, {})
    assert r.refresh() == ["variant 'mec', checkpoint 'm': sha256 mismatch"]
    assert r.problem("mec", {"mec": object()}) == "variant 'mec', checkpoint 'm': sha256 mismatch"


def test_the_readiness_policy_is_all_or_routes():
    with pytest.raises(ConfigError, match="server.readiness: expected all or routes"):
        parse_config({**CFG, "server": {"readiness": "some"}})


# fallback -------------------------------------------------------------------------------------------------

def test_a_down_variants_share_goes_to_the_fallback_and_its_clients_come_back_after():
    cfg = parse_config({**CFG, "routes": {**CFG["routes"], "fashion": {**CFG["routes"]["fashion"],
                                                                        "fallback": "compact"}}})
    router = Router(cfg)
    clients = [f"u{i}" for i in range(400)]
    before = {c: router.assign("fashion", client_id=c).variant for c in clients}
    during = {c: router.assign("fashion", client_id=c, down=frozenset({"b0"})) for c in clients}
    for c in clients:
        if before[c] == "b0":
            assert (during[c].variant, during[c].how, during[c].instead_of) == ("compact", "fallback", "b0")
        else:  # the others keep their variant
            assert during[c].variant == before[c] and during[c].how == "split"
    assert {c: router.assign("fashion", client_id=c).variant for c in clients} == before
    assert Counter(before.values())["b0"] > 150
    # named explicitly, the down variant stays (its request is answered 503 by the gateway)
    assert router.assign("fashion", "b0", down=frozenset({"b0"})).how == "explicit"
    # a shadow to a down variant is not mirrored; a fallback that is down too does not stand in
    assert router.assign("fashion", client_id="u1", down=frozenset({"mec"})).shadow is None
    picked_b0 = next(c for c in clients if before[c] == "b0")
    assert router.assign("fashion", client_id=picked_b0, down=frozenset({"b0", "compact"})).variant == "b0"


@pytest.mark.parametrize("fallback, message", [
    ("b7", r"routes.fashion.fallback: unknown variant 'b7'"),
    ("b0", r"routes.fashion.fallback: 'b0' is the whole split"),
])
def test_a_fallback_is_checked_when_the_configuration_loads(fallback, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({**CFG, "routes": {**CFG["routes"], "fashion": {"split": {"b0": 1}, "fallback": fallback}}})


def test_a_fallback_with_other_classes_than_its_route_is_refused():
    cfg = parse_config({**CFG, "routes": {**CFG["routes"], "fashion": {"split": {"b0": 1, "mec": 1, "compact": 1},
                                                                        "fallback": "lite0"}}})
    with pytest.raises(ConfigError, match="variant 'lite0'"):
        check_label_spaces(cfg, {"b0": list("abc"), "mec": list("abc"), "compact": list("abc"), "lite0": list("xyz")})


# through the request path -----------------------------------------------------------------------------------

@pytest.fixture
def two_routes():
    """A gateway on a stand-in worker per variant: fashion = b0 (fallback compact), other = compact."""
    import types
    import warnings

    from starlette.applications import Starlette
    from starlette.routing import Route

    from service.dispatch import Dispatcher
    from tests.service.fakes import gateway

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    cfg = parse_config({"variants": {"b0": {"model": "b0:latest", "max_inflight": 1},
                                     "compact": {"model": "c:latest", "max_inflight": 1}},
                        "routes": {"fashion": {"split": ["b0"], "fallback": "compact"},
                                   "other": {"split": ["compact"]}},
                        "server": {"burst_inflight": 2, "worker_transport": "http"}})
    m = types.SimpleNamespace(classes=["a", "b", "c"], num_classes=3, resolution=32, resize=None)
    gw = gateway(cfg, {"b0": m, "compact": m})
    workers = {"b0": FlakyWorker(0), "compact": FlakyWorker(0)}
    gw.dispatcher = gw.shadows.dispatcher = Dispatcher(cfg, lambda v: [workers[v]], {}, {"b0": 1, "compact": 1})
    gw.health = gw.readiness.health = gw.dispatcher.health
    app = Starlette(routes=[Route("/classify", gw.classify, methods=["POST"])])
    with TestClient(app) as c:
        c.gw = gw
        yield c


def post(client, **data):
    from tests.service.fakes import RGB, encode

    t0 = time.monotonic()
    r = client.post("/classify", files={"image": ("a.png", encode(RGB, "PNG"))}, data=data)
    return r, time.monotonic() - t0


def test_a_full_variant_gets_429_naming_it_while_the_other_route_answers(two_routes):
    adm = two_routes.gw.admission
    adm.admit("b0"), adm.admit("b0")  # its own place and its half of the burst pool
    r, _ = post(two_routes, route="fashion")
    assert r.status_code == 429 and r.headers["retry-after"] == "1" and "variant 'b0' is overloaded" in r.json()["error"]
    r, _ = post(two_routes, route="other")
    assert r.status_code == 200 and r.json()["variant"] == "compact"


def test_a_down_variant_is_answered_by_its_fallback_or_503_when_named(two_routes):
    two_routes.gw.health.mark_down("b0", 0, "exited", "its worker process 99 exited")
    r, _ = post(two_routes, variant="b0")
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert "variant 'b0' is down: its worker process 99 exited" in r.json()["error"]
    r, _ = post(two_routes, route="fashion")
    body = r.json()
    assert r.status_code == 200 and (body["variant"], body["assignment"], body["instead_of"]) == ("compact", "fallback", "b0")
    two_routes.gw.health.record("b0", 0, {"ready": True})
    r, _ = post(two_routes, route="fashion")
    assert r.status_code == 200 and (r.json()["variant"], r.json()["assignment"]) == ("b0", "default")


def test_a_live_route_change_keeps_the_routes_fallback():
    from tests.service.fakes import gateway_for_routes

    cfg = parse_config({**CFG, "routes": {**CFG["routes"], "fashion": {**CFG["routes"]["fashion"], "fallback": "compact"}}})
    gw = gateway_for_routes(cfg=cfg)
    out = gw.change_route("fashion", {"split": {"b0": 1, "mec": 1, "compact": 1}})
    assert out["fallback"] == "compact" and gw.cfg.routes["fashion"].fallback == "compact"
