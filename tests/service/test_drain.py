"""SIGTERM drains (service/drain.py, cli/serve.py): over HTTP against a real `effnet serve`, and the
drain's decisions without a server."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from service import drain
from tests.support.serving import FASHION_CLASSES, free_port, make_checkpoint, write_config

ROOT = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_gateway_drains_once_its_admitted_requests_are_done(tmp_path):
    clock = Clock()
    d = drain.Drain("gateway", grace_s=10, retry_after_s=1, runtime_dir=str(tmp_path), clock=clock)
    d.started()
    assert drain.gateway_state(d.file) == "serving"
    d.inflight = 2
    assert d.begin() and not d.begin()  # a second signal does not start another drain
    assert drain.gateway_state(d.file) == "draining"
    assert not d.finished()
    d.inflight = 0
    assert d.finished()
    d.end()
    assert drain.gateway_state(d.file) is None and not d.file.exists()


def test_a_drain_ends_at_its_grace_period_even_with_requests_in_flight(tmp_path):
    clock = Clock()
    d = drain.Drain("gateway", grace_s=10, retry_after_s=1, runtime_dir=str(tmp_path), clock=clock)
    d.inflight = 1
    d.begin()
    clock.now += 9.9
    assert not d.finished()
    clock.now += 0.2
    assert d.finished()


def test_a_worker_serves_on_while_its_gateway_drains(tmp_path):
    clock = Clock()
    gw = drain.Drain("gateway", grace_s=10, retry_after_s=1, runtime_dir=str(tmp_path), clock=clock)
    w = drain.Drain("worker", grace_s=10, retry_after_s=1, runtime_dir=str(tmp_path), clock=clock)
    assert w.file == gw.file  # both are children of one arbiter
    gw.started()
    w.begin()  # the arbiter signalled the worker first
    assert not w.finished()  # the gateway may not have had its signal yet
    gw.begin()
    clock.now += 5
    assert not w.finished()  # the gateway still drains: its admitted requests need this worker
    gw.end()
    assert w.finished()


def test_a_worker_stopped_alone_waits_only_for_its_own_calls(tmp_path):
    clock = Clock()
    gw = drain.Drain("gateway", grace_s=10, retry_after_s=1, runtime_dir=str(tmp_path), clock=clock)
    w = drain.Drain("worker", grace_s=10, retry_after_s=1, runtime_dir=str(tmp_path), clock=clock)
    gw.started()
    w.begin()
    w.inflight = 1
    clock.now += drain.GATEWAY_SIGNAL_S
    assert not w.finished()
    w.inflight = 0
    assert w.finished()


def test_the_listener_is_closed_for_everyone_only_when_the_workers_stop_too(tmp_path, monkeypatch):
    closed = []
    monkeypatch.setattr(drain, "stop_listening", lambda fd: closed.append(fd))
    monkeypatch.setattr(drain, "listening_fd", lambda: 7)
    gw = drain.Drain("gateway", grace_s=10, retry_after_s=1, runtime_dir=str(tmp_path))
    gw.begin()
    gw.end()  # the gateway alone: the arbiter restarts it on the same socket
    assert closed == []
    w = drain.Drain("worker", grace_s=10, retry_after_s=1, runtime_dir=str(tmp_path))
    w.begin()
    assert drain.worker_marks(gw.file) == [w.mark()]
    gw.since = None
    gw.begin()
    gw.end()  # the whole server stops
    assert closed == [7]
    w.end()
    assert drain.worker_marks(gw.file) == []


def test_a_dead_gateway_does_not_hold_its_workers(tmp_path):
    path = drain.gateway_file(tmp_path, 1234)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path.write_text(json.dumps({"pid": dead.pid, "state": "draining"}))
    assert drain.gateway_state(path) is None


def test_the_listening_socket_is_found_on_bentomls_command_line():
    assert drain.listening_fd(["x", "--fd", "7", "--worker-id", "1"]) == 7
    assert drain.listening_fd(["x", "--worker-id", "1"]) is None


def test_closing_the_listener_refuses_connections_for_every_process_that_holds_it():
    listener = socket.create_server(("127.0.0.1", 0))
    copy = os.dup(listener.fileno())  # as the arbiter keeps its copy
    try:
        drain.stop_listening(listener.fileno())
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(listener.getsockname(), timeout=2)
    finally:
        os.close(copy)
        listener.close()


# -- over HTTP ---------------------------------------------------------------------------------------------

def _multipart_head(port: int, data: bytes) -> tuple[bytes, bytes]:
    """A /classify request split in two: headers and the body's first part, then the rest."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /classify HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; "
            f"boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    half = len(body) // 2
    return head + body[:half], body[half:]


def _status_of(sock: socket.socket) -> tuple[int, bytes]:
    sock.settimeout(30)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1]), data


@pytest.mark.server
@pytest.mark.slow
def test_sigterm_finishes_admitted_requests_and_refuses_new_ones_then_stops(tmp_path):
    from tests.service.test_gateway_http import png

    home = tmp_path / "bentoml"
    tag = make_checkpoint(home, "compact-fashion-mnist", "compact", FASHION_CLASSES, 32, grayscale=True)
    grace = 6
    cfg = write_config(tmp_path / "serve.yaml", {
        "server": {"drain_grace_s": grace, "retry_after_s": 2},
        "variants": {"compact": {"model": tag.split(":")[0] + ":latest", "engine": "torch", "max_batch_size": 4,
                                 "max_latency_ms": 2000}},
        "routes": {"fashion": {"split": ["compact"]}},
    })
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "wb")
    env = {**os.environ, "BENTOML_HOME": str(home)}
    proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--config", str(cfg), "--port", str(port)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-4000:]
            try:
                if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        data = png(seed=3)
        assert httpx.post(url + "/classify", files={"image": ("x.png", data, "image/png")}, timeout=30).status_code == 200

        # Admitted: three requests whose bodies are half sent when the signal comes; they are decoded
        # and sent to the worker only after it.
        admitted = []
        for _ in range(3):
            first, rest = _multipart_head(port, data)
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(first)
            admitted.append((s, rest))
        time.sleep(0.5)  # the gateway has read their headers
        import psutil

        server_processes = psutil.Process(proc.pid).children(recursive=True)
        assert len(server_processes) >= 3  # the arbiter, the gateway, the worker
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)

        r = None
        while time.monotonic() < t0 + 5:  # the signal reaches the gateway through effnet serve and the arbiter
            r = httpx.get(url + "/readyz", timeout=2)
            if r.status_code == 503:
                break
            time.sleep(0.05)
        assert r is not None and r.status_code == 503 and "draining" in r.text, r and r.text
        r = httpx.post(url + "/classify", files={"image": ("x.png", data, "image/png")}, timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"] == "2", r.text
        assert "shutting down" in r.json()["error"]

        time.sleep(1)  # the workers must still be there for what the gateway admitted
        for s, rest in admitted:
            s.sendall(rest)
        for s, _ in admitted:
            status, head = _status_of(s)
            s.close()
            assert status == 200, head

        proc.wait(timeout=grace + 10)
        assert time.monotonic() - t0 < grace + 10 and proc.returncode == 0, proc.returncode
        assert not [p for p in server_processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/readyz", timeout=2)
        out = (tmp_path / "server.log").read_text()
        assert "gateway" in out and "drained" in out, out[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


def test_the_drain_belongs_to_no_request(tmp_path, monkeypatch):
    """The signal interrupts whatever request the main thread was handling; the drain's log lines and task
    must not carry that request's id."""
    import asyncio
    import logging

    from service.request_log import REQUEST_ID

    seen = []

    class Grab(logging.Handler):
        def emit(self, record):
            seen.append(REQUEST_ID.get())

    handler = Grab()
    drain.logger.addHandler(handler)
    handlers = {}
    monkeypatch.setattr(drain.signal, "signal", lambda sig, h: handlers.setdefault(sig, h))
    monkeypatch.setattr(drain, "_die_with_parent", lambda: None)
    monkeypatch.setattr(drain.threading, "Timer", lambda *a: type("T", (), {"start": lambda s: None, "daemon": 0})())
    handed_on = []

    async def main():
        d = drain.Drain("worker", grace_s=0.2, retry_after_s=1, runtime_dir=str(tmp_path))
        monkeypatch.setattr(drain.signal, "getsignal", lambda sig: lambda s, f: handed_on.append(s))  # uvicorn's
        assert drain.install(d, asyncio.get_running_loop())
        token = REQUEST_ID.set("a-request")
        try:
            handlers[signal.SIGTERM](signal.SIGTERM, None)
        finally:
            REQUEST_ID.reset(token)
        deadline = time.monotonic() + 5
        while not d.done and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert d.done

    try:
        asyncio.run(main())
    finally:
        drain.logger.removeHandler(handler)
    assert handed_on == [signal.SIGTERM] and seen and set(seen) == {None}


def _sent_by(app_behaviour):
    """What DrainMiddleware sends for a request whose handler does `app_behaviour(receive, send)`."""
    import asyncio

    sent = []

    async def app(scope, receive, send):
        await app_behaviour(receive, send)

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    mw = drain.DrainMiddleware(app, role="gateway", grace_s=5, retry_after_s=1)
    asyncio.run(mw({"type": "http", "path": "/classify", "method": "POST", "headers": []}, receive, send))
    return [m.get("status") for m in sent if m["type"] == "http.response.start"]


def test_a_request_that_ends_without_an_answer_gets_one_at_once():
    async def silent(receive, send):
        return None

    async def left(receive, send):
        await receive()  # the client left

    async def answered(receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    assert _sent_by(silent) == [500]
    assert _sent_by(left) == [499]
    assert _sent_by(answered) == [200]
