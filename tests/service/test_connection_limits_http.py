"""The gateway's HTTP edge under `bentoml serve` (uvicorn with httptools): an oversized body is refused
with its 413 whatever the client, and stalled connections are bounded. One server for the module."""
import io
import json
import socket
import statistics
import subprocess
import time
import urllib.error
import urllib.request

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from tests.support.serving import FASHION_CLASSES, Server, make_checkpoint, write_config

pytestmark = [pytest.mark.slow, pytest.mark.server]

LIMIT = "above the limit of 1,048,576 bytes"
BIG = 40 * 1024 * 1024  # what a client might upload by mistake: a raw photo, a video


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("edge") / "bentoml"
    make_checkpoint(home, "b0-fashion-mnist", "b0", FASHION_CLASSES, 32, grayscale=True, seed=1)
    cfg = write_config(home.parent / "serve.yaml", {
        "server": {"max_body_mb": 1, "cpu_threads": 1, "header_timeout_s": 2},
        "variants": {"b0": {"model": "b0-fashion-mnist:latest", "engine": "torch", "placement": "gateway"}},
        "routes": {"fashion": {"split": {"b0": 1}}},
    })
    with Server(home, cfg) as s:
        s.wait("/readyz")
        yield s


def gateway_process(server) -> psutil.Process:
    """The process that serves the port: BentoML's entry service, a child of the arbiter."""
    for p in psutil.Process(server.proc.pid).children(recursive=True):
        if "effnet-gateway" in " ".join(p.cmdline()):
            return p
    raise AssertionError("no gateway process")


def png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def multipart(size: int) -> tuple[bytes, str]:
    boundary = "edge-test-boundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()
    return head + b"\0" * size + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_python_urllib_sees_the_413_for_an_oversized_body(server):
    """urllib sends the whole body before it reads, with `Connection: close`: without a lingering close the
    server's close with unread data resets the connection and the 413 is lost."""
    body, ctype = multipart(BIG)
    for _ in range(3):
        req = urllib.request.Request(server.url + "/classify", data=body, headers={"Content-Type": ctype})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=60)
        assert e.value.code == 413 and LIMIT in json.loads(e.value.read())["error"]
    assert httpx.get(server.url + "/readyz", timeout=10).status_code == 200


def test_curl_and_httpx_still_see_the_413(server, tmp_path):
    body, ctype = multipart(BIG)
    path = tmp_path / "body"
    path.write_bytes(body)
    out = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", "-H", f"Content-Type: {ctype}", "--data-binary",
                          f"@{path}", server.url + "/classify"], capture_output=True, text=True, timeout=60, check=True)
    text, status = out.stdout.rsplit("\n", 1)
    assert status == "413" and LIMIT in json.loads(text)["error"]
    r = httpx.post(server.url + "/classify", content=body, headers={"Content-Type": ctype}, timeout=60)
    assert r.status_code == 413 and LIMIT in r.json()["error"]


def classify_seconds(client: httpx.Client, image: bytes) -> float:
    start = time.monotonic()
    r = client.post("/classify", files={"image": ("x.png", image, "image/png")})
    assert r.status_code == 200, r.text
    return time.monotonic() - start


def test_500_stalled_connections_neither_delay_a_client_nor_outlive_the_header_deadline(server):
    gateway, image = gateway_process(server), png()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        usual = statistics.median(classify_seconds(client, image) for _ in range(5))
        fds = gateway.num_fds()
        socks = []
        try:
            for _ in range(500):
                s = socket.create_connection(("127.0.0.1", server.port))
                s.sendall(b"POST /classi")  # half a request line, then nothing
                socks.append(s)
            during = statistics.median(classify_seconds(client, image) for _ in range(5))
            assert during < max(3 * usual, usual + 0.25), (usual, during)
            for s in socks:  # each is answered 408 at the 2 s deadline and closed
                s.settimeout(10)
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
                assert data.startswith(b"HTTP/1.1 408 ")
        finally:
            for s in socks:
                s.close()
        deadline = time.monotonic() + 10
        while gateway.num_fds() > fds + 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gateway.num_fds() <= fds + 5
        classify_seconds(client, image)
