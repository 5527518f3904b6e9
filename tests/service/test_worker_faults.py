"""A worker that hangs or dies costs only its variant, over HTTP on one real server (own port and
BENTOML_HOME): its requests get 503 + Retry-After at once, the other route keeps answering 200, the
route's fallback takes the variant's share, /readyz says so, and the variant comes back by itself.

Timings are loose here (the machine is shared with other tests); the chaos run measures them."""
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from service.workers import service_name
from tests.support.serving import FASHION_CLASSES, Server, make_checkpoint, write_config

pytestmark = [pytest.mark.slow, pytest.mark.server]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("faults") / "bentoml"
    tags = {v: make_checkpoint(home, f"{v}-fashion-mnist", v, FASHION_CLASSES, 32, grayscale=True, seed=i)
            for i, v in enumerate(["b0", "compact"])}
    cfg = write_config(home.parent / "serve.yaml", {
        "server": {"cpu_threads": 2},
        "variants": {v: {"model": t.split(":")[0] + ":latest", "engine": "torch", "max_batch_size": 8,
                         "max_latency_ms": 2000} for v, t in tags.items()},
        "routes": {"fashion": {"split": {"b0": 1}, "fallback": "compact"}, "other": {"split": {"compact": 1}}},
    })
    with Server(home, cfg) as s:
        s.wait("/readyz")
        s.client = httpx.Client(base_url=s.url, timeout=30)
        yield s
        s.client.close()


def worker_pid(server, variant: str) -> int:
    """The process serving `variant` under this server's arbiter, found by its command line."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == server.proc.pid and service_name(variant).encode() in cmd:
            return int(pid)
    raise LookupError(f"no worker process for {variant}")


def classify(server, **data):
    from tests.service.test_gateway_http import png

    t0 = time.monotonic()
    r = server.client.post("/classify", files={"image": ("x.png", png(seed=3), "image/png")}, data=data)
    return r, time.monotonic() - t0


def until(predicate, timeout: float, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := predicate()):
            return value
        time.sleep(step)
    raise TimeoutError(f"not within {timeout} s")


def metric(server, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in server.client.get("/metrics").text.splitlines():
        if line.startswith(name + "{") and want in line:
            return float(line.rsplit(" ", 1)[1])
    raise LookupError(name)


def assert_isolated(server, *variant_reasons: str) -> None:
    """While b0 is down: its requests 503 at once (for one of `variant_reasons`), the other route 200, fashion
    by its fallback."""
    r, _ = classify(server, variant="b0")
    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    assert any(f"variant 'b0' is down: {why}" in r.json()["error"] for why in variant_reasons), r.text
    r, _ = classify(server, route="other")
    assert r.status_code == 200 and r.json()["variant"] == "compact", r.text
    r, _ = classify(server, route="fashion")
    body = r.json()
    assert r.status_code == 200 and (body["variant"], body["assignment"], body["instead_of"]) == ("compact", "fallback", "b0")
    ready, overall = server.client.get("/readyz/b0"), server.client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["replicas"][0]["state"] == "down"
    assert overall.status_code == 503 and "variant 'b0' is down" in overall.text
    assert server.client.get("/readyz/compact").status_code == 200
    assert metric(server, "effnet_variant_ready", variant="b0") == 0


def assert_back(server, timeout: float) -> None:
    until(lambda: server.client.get("/readyz/b0").status_code == 200, timeout)
    r, _ = classify(server, route="fashion")
    assert r.status_code == 200 and (r.json()["variant"], r.json()["assignment"]) == ("b0", "default"), r.text
    assert server.client.get("/readyz").status_code == 200
    assert metric(server, "effnet_variant_ready", variant="b0") == 1


def test_a_hung_worker_is_marked_down_by_the_health_check_and_up_once_it_answers(server):
    pid = worker_pid(server, "b0")
    assert server.client.get("/readyz/b0").json()["replicas"][0]["pid"] == pid  # what the worker reports
    os.kill(pid, signal.SIGSTOP)
    try:
        until(lambda: server.client.get("/readyz/b0").status_code == 503, 5)
        assert_isolated(server, "worker replica 1 did not answer its health check")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert_back(server, 10)
    assert worker_pid(server, "b0") == pid  # the same process, not a restart


def test_a_killed_worker_is_marked_down_at_once_and_its_restart_serves_again(server):
    pid = worker_pid(server, "b0")
    os.kill(pid, signal.SIGKILL)
    until(lambda: server.client.get("/readyz/b0").status_code == 503, 2, step=0.05)  # marked down at once
    # whichever notices first: the supervisor's exit watch, or a call or health check that finds nobody there
    assert_isolated(server, f"its worker process {pid} exited", "worker replica 1 cannot be reached")
    assert_back(server, 180)  # BentoML restarts it, then it loads its checkpoint
    assert worker_pid(server, "b0") != pid
