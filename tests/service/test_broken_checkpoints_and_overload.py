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


def test_a_corrupted_checkpoint_leaves_the_service_not_ready_with_the_reason(tmp_path):
    """One server, the corrupted checkpoint served twice: by a worker process and inside the gateway."""
    home = tmp_path / "bentoml"
    placements = {"inworker": "worker", "ingateway": "gateway"}
    for variant, placement in placements.items():
        tag = make_checkpoint(home, f"{variant}-fashion-mnist", "compact", FASHION_CLASSES, 32, grayscale=True)
        name, version = tag.split(":")
        weights = home / "models" / name / version / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-10] ^= 0xFF  # one flipped byte: the sha256 no longer matches the manifest
        weights.write_bytes(bytes(data))
    cfg = write_config(tmp_path / "serve.yaml", {
        "variants": {v: {"model": f"{v}-fashion-mnist:latest", "engine": "torch", "max_batch_size": 8,
                         "max_latency_ms": 2000, "placement": p} for v, p in placements.items()},
        "routes": {v: {"split": [v]} for v in placements},
    })
    with Server(home, cfg) as server:
        server.wait("/livez")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # each loads (and refuses) its checkpoint
            r = httpx.get(server.url + "/readyz", timeout=10)
            if r.text.count("sha256") >= 2:
                break
            time.sleep(0.5)
        assert r.status_code == 503
        for variant in placements:
            assert re.search(rf"variant '{variant}', checkpoint '{variant}-fashion-mnist:latest'.*sha256", r.text), r.text
            a = httpx.post(server.url + "/classify", files={"image": ("a.png", b"\x89PNG")}, data={"variant": variant},
                           timeout=30)
            assert a.status_code == 503 and a.headers["retry-after"] == "1"
            assert "not ready" in a.json()["error"] and "sha256" in a.json()["error"]

        time.sleep(3)  # a crash loop would restart the worker or gateway (about 1 s each) and log it again
        assert httpx.get(server.url + "/livez", timeout=10).status_code == 200
        log = Path(server.log).read_text()
        assert log.count("effnet variant NOT READY") == 2, log[-3000:]  # once each
        assert all(f"{v}-fashion-mnist" in log for v in placements) and "sha256" in log


@pytest.mark.parametrize("transport, placements", [("shared_memory", ("worker", "gateway")), ("http", ("worker",))])
def test_past_capacity_requests_are_refused_fast_with_retry_after(tmp_path, transport, placements):
    """max_inflight 3 and a 30 ms batching budget against 24 clients at once: every answer is a 200, a
    429 from the gateway's in-flight limit or a 503 from the variant's queue (BentoML's batcher in a
    worker, the coalescer in the gateway), each refusal with Retry-After and a message, all within
    seconds, and the server is still ready afterwards. Batches reach a worker process by shared memory
    (the default, service/shm.py) or in the HTTP body (`worker_transport: http`); one server per
    transport, with a variant per placement, loaded one after the other."""
    home = tmp_path / "bentoml"
    names = {f"b0-{p}": p for p in placements}
    for name in names:
        make_checkpoint(home, f"{name}-fashion-mnist", "b0", FASHION_CLASSES, 32, grayscale=True)
    cfg = write_config(tmp_path / "serve.yaml", {
        "server": {"max_inflight": 3, "retry_after_s": 2, "worker_transport": transport},
        "variants": {n: {"model": f"{n}-fashion-mnist:latest", "engine": "torch", "max_batch_size": 4,
                         "max_latency_ms": 30, "placement": p} for n, p in names.items()},
        "routes": {n: {"split": [n]} for n in names},
    })
    from tests.service.test_gateway_http import png

    data = png(seed=1)
    with Server(home, cfg) as server:
        server.wait("/readyz")
        for variant, placement in names.items():
            def one(i):
                with httpx.Client(base_url=server.url, timeout=60) as http:
                    t0 = time.monotonic()
                    r = http.post("/classify", files={"image": ("x.png", data, "image/png")}, data={"variant": variant})
                    return r.status_code, r.headers.get("retry-after"), r.text, time.monotonic() - t0

            with ThreadPoolExecutor(24) as pool:
                answers = list(pool.map(one, range(96)))
            statuses = [a[0] for a in answers]
            assert set(statuses) <= {200, 429, 503}, statuses
            assert 200 in statuses and (429 in statuses or 503 in statuses), (variant, statuses)
            for status, retry_after, text, _ in answers:
                if status != 200:
                    assert retry_after is not None and int(retry_after) >= 1, (status, text)
                    assert "error" in text and len(text) > 20, text
            assert max(a[3] for a in answers) < 20, sorted(a[3] for a in answers)[-5:]
            assert httpx.get(server.url + "/readyz", timeout=10).status_code == 200
            row = next(v for v in httpx.get(server.url + "/variants", timeout=10).json()["variants"]
                       if v["variant"] == variant)
            assert row["worker_transport"] == {"worker": transport, "gateway": "in_process"}[placement]
            if placement == "worker":  # the worker API that carried the batches
                used = {"shared_memory": "/predict_shared", "http": "/predict"}[transport]
                metrics = httpx.get(server.url + "/metrics", timeout=10).text.splitlines()
                lines = [ln for ln in metrics
                         if ln.startswith("bentoml_service_request_total{") and f'endpoint="{used}"' in ln
                         and f'service_name="effnet-worker-{variant}"' in ln and not ln.endswith(" 0.0")]
                assert lines, used
                assert [ln for ln in metrics if ln.startswith("effnet_worker_calls_total{")
                        and f'transport="{transport}"' in ln and not ln.endswith(" 0.0")], transport
