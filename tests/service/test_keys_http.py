"""Client keys through a real `bentoml serve`: 401 without a key or with a wrong one, 200 with a good one, 429 with
Retry-After for a key past its quota while another key's requests go on, a new key taken without a restart,
and per-key metrics that name keys, never show them."""
from __future__ import annotations

import io
import re
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from service.keys import hash_key
from tests.support.serving import FASHION_CLASSES, Server, make_checkpoint, write_config

pytestmark = pytest.mark.server

ALICE, BOB, CAROL = "alice-key-0123456789", "bob-key-0123456789", "carol-key-0123456789"


def _keys_text(*extra: str) -> str:
    # alice: one request per 100 s, so her second request is past the quota however slow the machine is
    return "\n".join([f"alice: {{sha256: {hash_key(ALICE)}, requests_per_s: 0.01}}", f"bob: {hash_key(BOB)}",
                      *extra]) + "\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("keys") / "bentoml"
    make_checkpoint(home, "compact-fashion-mnist", "compact", FASHION_CLASSES, 32, grayscale=True)
    keys = home.parent / "keys.yaml"
    keys.write_text(_keys_text())
    cfg = write_config(home.parent / "serve.yaml", {
        "server": {"cpu_threads": 1, "api_keys": "keys.yaml", "api_keys_poll_s": 0.2},
        # in the gateway's process: no worker to start
        "variants": {"compact": {"model": "compact-fashion-mnist:latest", "engine": "torch", "placement": "gateway"}},
        "routes": {"fashion": {"split": {"compact": 1}}},
    })
    with Server(home, cfg) as s:
        s.wait("/readyz")
        s.client = httpx.Client(base_url=s.url, timeout=60)
        s.keys = keys
        yield s
        s.client.close()


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def classify(server, headers: dict | None = None) -> httpx.Response:
    return server.client.post("/classify", files={"image": ("x.png", _png(), "image/png")}, headers=headers or {})


def test_no_key_and_a_wrong_key_get_the_same_401_and_health_needs_none(server):
    none, wrong = classify(server), classify(server, {"Authorization": "Bearer not-a-key"})
    assert none.status_code == wrong.status_code == 401, none.text
    assert none.json()["error"] == wrong.json()["error"]
    assert classify(server, {"X-Api-Key": hash_key(BOB)}).status_code == 401  # the stored hash is no key
    assert server.client.get("/readyz").status_code == 200
    assert server.client.get("/metrics").status_code == 200


def test_a_key_past_its_quota_gets_429_while_another_key_gets_200(server):
    first = classify(server, {"X-Api-Key": ALICE})
    assert first.status_code == 200, first.text
    assert first.json()["predictions"][0]["label"] in FASHION_CLASSES
    past = classify(server, {"X-Api-Key": ALICE})
    assert past.status_code == 429 and "quota" in past.json()["error"]
    assert 1 <= int(past.headers["Retry-After"]) <= 100
    for _ in range(3):
        assert classify(server, {"Authorization": f"Bearer {BOB}"}).status_code == 200
    assert classify(server, {"X-Api-Key": ALICE}).status_code == 429


def test_a_key_added_to_the_file_is_taken_without_a_restart(server):
    server.keys.write_text(_keys_text(f"carol: {hash_key(CAROL)}"))
    deadline, status = time.monotonic() + 20, 0
    while time.monotonic() < deadline and status != 200:
        status = classify(server, {"X-Api-Key": CAROL}).status_code
        time.sleep(0.2)
    assert status == 200


def test_metrics_count_requests_per_key_name_and_never_show_a_key(server):
    classify(server)
    text = server.client.get("/metrics").text
    series = dict(re.findall(r'effnet_key_requests_total\{(.*?)\} (\S+)', text))
    assert float(series['key="none",outcome="unauthorized"']) >= 1
    assert float(series['key="alice",outcome="over_rate"']) >= 1
    assert float(series['key="bob",outcome="admitted"']) >= 3
    for key in (ALICE, BOB, CAROL):
        assert key not in text and hash_key(key) not in text
