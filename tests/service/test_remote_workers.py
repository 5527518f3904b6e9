"""`workers_at`: its validation, and how a variant's replicas follow its addresses (service/worker_addresses.py,
service/remote_workers.py). The cross-host run itself is tests/service/test_multihost.py."""
import asyncio

import numpy as np
import pytest

from service.config import ConfigError, parse_config
from service.health import DOWN, Health
from service.remote_workers import RemoteWorkers
from service.results import InferenceResult
from service.worker_addresses import addresses, resolve

BASE = {"routes": {"r": {"split": {"b0": 1}}}}


def config(**b0):
    return parse_config({"variants": {"b0": {"model": "b0-fashion-mnist:latest", **b0}}, **BASE})


def test_workers_at_takes_urls_or_one_dns_name():
    v = config(workers_at=["http://10.0.0.2:3001", "http://10.0.0.3:3001/"]).variants["b0"]
    assert v.workers_at == ("http://10.0.0.2:3001", "http://10.0.0.3:3001")
    assert v.resolved_calls_in_flight == 4  # two per listed worker
    v = config(workers_at="dns://effnet-worker-b0.effnet.svc:3000", resolve_every_s=5).variants["b0"]
    assert addresses(v.workers_at).name == "effnet-worker-b0.effnet.svc" and v.resolve_every_s == 5


@pytest.mark.parametrize("bad, says", [
    (["10.0.0.2:3001"], "http://HOST:PORT"),
    (["http://10.0.0.2"], "http://HOST:PORT"),
    (["http://10.0.0.2:99999"], "http://HOST:PORT"),
    (["http://10.0.0.2:3001/predict"], "http://HOST:PORT"),
    (["http://a:1", "http://a:1"], "listed twice"),
    ([], "list of worker URLs"),
    ([3001], "expected a URL"),
    (["dns://name:3000", "http://a:1"], "stands alone"),
    ("dns://name", "dns://NAME:PORT"),
])
def test_a_bad_workers_at_is_refused_naming_the_key(bad, says):
    with pytest.raises(ConfigError, match="variants.b0.workers_at") as e:
        config(workers_at=bad)
    assert says in str(e.value)


def test_workers_at_is_refused_for_a_variant_placed_in_the_gateway():
    with pytest.raises(ConfigError, match="placed in the gateway"):
        config(workers_at=["http://10.0.0.2:3001"], placement="gateway")


def test_a_dns_name_resolves_to_one_replica_per_address():
    urls = asyncio.run(resolve(addresses("dns://localhost:3000")))
    assert "http://127.0.0.1:3000" in urls and len(urls) == len(set(urls))


class Service:  # stands in for the worker's BentoML service class: RemoteWorkers.client is not called
    pass


def remote(cfg):
    health, calls = Health({}, check=None), {}
    changes = []
    rw = RemoteWorkers(cfg, health, calls, lambda v: Service, on_change=lambda v, n: changes.append(n))
    rw.client = lambda variant, url: f"client of {url}"  # no BentoML client: only the bookkeeping is under test
    return rw, health, calls, changes


def test_replicas_follow_the_addresses_added_retired_and_back(monkeypatch):
    rw, health, calls, changes = remote(config(workers_at="dns://w:3000"))

    async def run():
        rw.apply("b0", ["http://10.0.0.2:3000", "http://10.0.0.3:3000"])
        assert rw.clients["b0"] == ["client of http://10.0.0.2:3000", "client of http://10.0.0.3:3000"]
        assert calls["b0"] == [0, 0] and [r.address for r in health.replicas["b0"]] == rw.urls["b0"]
        for i in (0, 1):
            health.record("b0", i, {"ready": True})
        assert health.usable("b0") == [0, 1]

        rw.apply("b0", ["http://10.0.0.3:3000"])  # a pod went away
        gone = health.replicas["b0"][0]
        assert gone.retired and gone.state == DOWN and "no longer resolved" in gone.reason
        assert health.usable("b0") == [1] and not health.is_down("b0")

        rw.apply("b0", ["http://10.0.0.3:3000", "http://10.0.0.4:3000", "http://10.0.0.2:3000"])
        assert rw.urls["b0"] == ["http://10.0.0.2:3000", "http://10.0.0.3:3000", "http://10.0.0.4:3000"]
        assert not gone.retired and health.usable("b0") == [1, 2]  # back, but called only once checked up
        health.record("b0", 0, {"ready": True})
        assert health.usable("b0") == [0, 1, 2]
        assert changes == [2, 1, 3]

        rw.apply("b0", [])
        assert health.is_down("b0") and health.usable("b0") == []

    asyncio.run(run())


def test_a_name_that_stops_resolving_keeps_its_replicas(monkeypatch):
    rw, health, _, _ = remote(config(workers_at="dns://w:3000"))

    async def failing(a):
        raise OSError("Name or service not known")

    async def run():
        rw.apply("b0", ["http://10.0.0.2:3000"])
        monkeypatch.setattr("service.remote_workers.resolve", failing)
        await rw.refresh("b0")
        assert rw.urls["b0"] == ["http://10.0.0.2:3000"] and not health.replicas["b0"][0].retired
        assert "does not resolve" in rw.describe("b0")["resolve_error"]

    asyncio.run(run())


def test_a_workers_answer_travels_as_json_and_back():
    result = InferenceResult(np.random.default_rng(0).random((3, 1000), dtype=np.float32), 0.25, engine="openvino")
    back = InferenceResult.from_wire(result.to_wire(), replica="worker 2")
    assert np.array_equal(back.scores, result.scores) and back.seconds == 0.25 and back.engine == "openvino"
    with pytest.raises(ValueError, match="not a worker's answer"):
        InferenceResult.from_wire({"scores": "AAAA", "shape": [2, 1000], "seconds": 0})
