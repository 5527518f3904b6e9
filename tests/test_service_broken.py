"""A corrupted checkpoint: the server starts, stays not ready and says why; it does not crash-loop."""
import re
import time
from pathlib import Path

import httpx
import pytest

from service.testing import FASHION_CLASSES, Server, make_checkpoint, write_config

pytestmark = pytest.mark.slow


def test_a_corrupted_checkpoint_leaves_the_service_not_ready_with_the_reason(tmp_path):
    home = tmp_path / "bentoml"
    tag = make_checkpoint(home, "compact-fashion-mnist", "compact", FASHION_CLASSES, 32, grayscale=True)
    name, version = tag.split(":")
    weights = home / "models" / name / version / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # one flipped byte: the sha256 no longer matches the manifest
    weights.write_bytes(bytes(data))
    cfg = write_config(tmp_path / "serve.yaml", {
        "variants": {"compact": {"model": f"{name}:latest"}},
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

        time.sleep(3)  # a crash loop would restart the worker (about 1 s each) and log it again
        assert httpx.get(server.url + "/livez", timeout=10).status_code == 200
        log = Path(server.log).read_text()
        assert log.count("effnet worker NOT READY") == 1, log[-3000:]
        assert "compact-fashion-mnist" in log and "sha256" in log
