"""The service in bad conditions, over HTTP: a corrupted checkpoint (not ready, says why, no crash
loop) and more clients than it takes (refused fast with 429/503 and Retry-After, never a timeout)."""
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.support.serving import FASHION_CLASSES, Server, make_checkpoint, write_config

pytestmark = [pytest.mark.slow, pytest.mark.server]


@pytest.mark.parametrize("placement", ["worker", "gateway"])
def test_a_corrupted_checkpoint_leaves_the_service_not_ready_with_the_reason(tmp_path, placement):
    home = tmp_path / "bentoml"
    tag = make_checkpoint(home, "compact-fashion-mnist", "compact", FASHION_CLASSES, 32, grayscale=True)
    name, version = tag.split(":")
    weights = home / "models" / name / version / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # one flipped byte: the sha256 no longer matches the manifest
    weights.write_bytes(bytes(data))
    cfg = write_config(tmp_path / "serve.yaml", {
        "variants": {"compact": {"model": f"{name}:latest", "engine": "torch", "max_batch_size": 8,
                                 "max_latency_ms": 2000, "placement": placement}},
        "routes": {"fashion": {"split": ["compact"]}},
    })
    with Server(home, cfg) as server:
        server.wait("/livez")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the worker loads (and refuses) the checkpoint
            r = httpx.get(server.url + "/readyz", timeout=10)
            if "sha256" in r.text:
                break
            time.sleep(0.5)
        assert r.status_code == 503
        assert re.search(r"variant 'compact', checkpoint 'compact-fashion-mnist:latest'.*sha256", r.text), r.text

        r = httpx.post(server.url + "/classify", files={"image": ("a.png", b"\x89PNG")}, timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "not ready" in r.json()["error"] and "sha256" in r.json()["error"]

        time.sleep(3)  # a crash loop would restart the worker or gateway (about 1 s each) and log it again
        assert httpx.get(server.url + "/livez", timeout=10).status_code == 200
        log = Path(server.log).read_text()
        assert log.count("effnet variant NOT READY") == 1, log[-3000:]
        assert "compact-fashion-mnist" in log and "sha256" in log


@pytest.mark.parametrize("placement, transport", [("worker", "shared_memory"), ("worker", "http"),
                                                  ("gateway", "shared_memory")])
def test_past_capacity_requests_are_refused_fast_with_retry_after(tmp_path, placement, transport):
    """max_inflight 3 and a 30 ms batching budget against 24 clients at once: every answer is a 200, a
    429 from the gateway's in-flight limit or a 503 from the variant's queue (BentoML's batcher in a
    worker, the coalescer in the gateway), each refusal with Retry-After and a message, all within
    seconds, and the server is still ready afterwards. Batches reach a worker process by shared memory
    (the default, service/shm.py) or in the HTTP body (`worker_transport: http`)."""
    home = tmp_path / "bentoml"
    tag = make_checkpoint(home, "b0-fashion-mnist", "b0", FASHION_CLASSES, 32, grayscale=True)
    cfg = write_config(tmp_path / "serve.yaml", {
        "server": {"max_inflight": 3, "retry_after_s": 2, "worker_transport": transport},
        "variants": {"b0": {"model": tag.split(":")[0] + ":latest", "engine": "torch", "max_batch_size": 4,
                            "max_latency_ms": 30,
                            "placement": placement}},
        "routes": {"fashion": {"split": ["b0"]}},
    })
    from tests.service.test_gateway_http import png

    data = png(seed=1)
    with Server(home, cfg) as server:
        server.wait("/readyz")

        def one(i):
            with httpx.Client(base_url=server.url, timeout=60) as http:
                t0 = time.monotonic()
                r = http.post("/classify", files={"image": ("x.png", data, "image/png")})
                return r.status_code, r.headers.get("retry-after"), r.text, time.monotonic() - t0

        with ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(one, range(96)))
        statuses = [a[0] for a in answers]
        assert set(statuses) <= {200, 429, 503}, statuses
        assert 200 in statuses and (429 in statuses or 503 in statuses), statuses
        for status, retry_after, text, _ in answers:
            if status != 200:
                assert retry_after is not None and int(retry_after) >= 1, (status, text)
                assert "error" in text and len(text) > 20, text
        assert max(a[3] for a in answers) < 20, sorted(a[3] for a in answers)[-5:]
        assert httpx.get(server.url + "/readyz", timeout=10).status_code == 200
        b0 = httpx.get(server.url + "/variants", timeout=10).json()["variants"][0]
        assert b0["worker_transport"] == {"worker": transport, "gateway": "in_process"}[placement]
        if placement == "worker":  # the worker API that carried the batches
            used = {"shared_memory": "/predict_shared", "http": "/predict"}[transport]
            lines = [ln for ln in httpx.get(server.url + "/metrics", timeout=10).text.splitlines()
                     if ln.startswith("bentoml_service_request_total{") and f'endpoint="{used}"' in ln
                     and 'service_name="effnet-worker-b0"' in ln and not ln.endswith(" 0.0")]
            assert lines, used
            assert [ln for ln in httpx.get(server.url + "/metrics", timeout=10).text.splitlines()
                    if ln.startswith("effnet_worker_calls_total{") and f'transport="{transport}"' in ln
                    and not ln.endswith(" 0.0")], transport
