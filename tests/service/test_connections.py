"""Header deadline, idle limit and connection cap (service.connections) on a real uvicorn server run in a
thread with each of its HTTP protocols; the gateway itself: test_connection_limits_http.py."""
import socket
import threading
import time
import types

import httpx
import pytest
import uvicorn

from service import connections
from service.connections import ConnectionLimits, limited_protocol

pytestmark = pytest.mark.server

HALF_REQUEST = b"POST /classi"  # half a request line, then nothing


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    if scope["path"] == "/slow":
        import asyncio

        await asyncio.sleep(float(scope["query_string"] or 1))
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def protocol_class(name):
    if name == "httptools":
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as cls
    else:
        from uvicorn.protocols.http.h11_impl import H11Protocol as cls
    return cls


def serve(protocol):
    """A uvicorn server with a 0.5 s header deadline, 0.5 s keep-alive and a cap of 60 connections."""
    limits = ConnectionLimits(header_timeout_s=0.5, max_connections=60, retry_after_s=2)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", loop="asyncio",
                            http=limited_protocol(protocol_class(protocol), limits), timeout_keep_alive=0.5)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not (srv.started and srv.servers) and time.monotonic() < deadline:
        time.sleep(0.02)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield types.SimpleNamespace(port=port, url=f"http://127.0.0.1:{port}", limits=limits, state=srv.server_state)
    srv.should_exit = True
    thread.join(10)


@pytest.fixture
def server():
    """httptools, as `bentoml serve` runs it."""
    yield from serve("httptools")


@pytest.fixture(params=["httptools", "h11"])
def any_server(request):
    """Each of uvicorn's protocols (h11 where httptools is not installed)."""
    yield from serve(request.param)


def stalled(port, n):
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(HALF_REQUEST)
        socks.append(s)
    return socks


def answer(sock, timeout=3.0):
    """What the server sent before closing (b"" if it closed without a word); raises if it stays open."""
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def timed_get(url):
    start = time.monotonic()
    with httpx.Client() as client:
        assert client.get(url + "/x").status_code == 200
    return time.monotonic() - start


def test_stalled_headers_do_not_delay_other_clients_and_are_answered_408_at_the_deadline(any_server):
    server = any_server
    usual = min(timed_get(server.url) for _ in range(3))
    socks = stalled(server.port, 50)
    during = min(timed_get(server.url) for _ in range(3))
    assert during < usual + 0.2
    try:
        for s in socks:
            data = answer(s)
            assert data.startswith(b"HTTP/1.1 408 ") and b"did not arrive within 0.5 s" in data
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: len(server.state.connections) == 0)
    assert server.limits.timed_out == 50


def test_the_deadline_restarts_for_each_request_on_a_kept_alive_connection(any_server):
    server = any_server
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        time.sleep(0.3)
        s.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n")  # the next request's headers, never finished
        data = answer(s)
    assert data.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 408 " in data


def test_an_idle_kept_alive_connection_is_closed_after_the_keep_alive_timeout(server):
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        data = answer(s)  # reads until the server closes the connection (after about 0.5 s), silently
        assert data.endswith(b"ok")


def test_a_request_slower_than_the_header_deadline_is_not_cut_off(server):
    with httpx.Client() as client:
        assert client.get(server.url + "/slow?1.0").status_code == 200


def test_above_the_cap_the_longest_waiting_connection_makes_room(server):
    """100 stalled connections against a cap of 60: the server never holds more than 60, and a normal
    client is still served at once."""
    server.limits.header_timeout_s = 10  # all of them still waiting for their headers when the cap is reached
    socks = stalled(server.port, 100)
    try:
        wait_for(lambda: server.limits.pushed_out >= 40)
        # A pushed-out connection is closed at once; uvicorn forgets it one loop turn later (connection_lost),
        # so the cap is on connections that are not closing.
        assert sum(not c.transport.is_closing() for c in list(server.state.connections)) <= 60
        wait_for(lambda: len(server.state.connections) <= 60)
        assert timed_get(server.url) < 2.0
        try:  # pushed out: closed without an answer (a reset, as the server left its half line unread)
            assert answer(socks[0]) == b""
        except ConnectionResetError:
            pass
    finally:
        for s in socks:
            s.close()


def test_above_the_cap_with_every_connection_busy_a_new_one_gets_503_with_retry_after(server):
    with httpx.Client(limits=httpx.Limits(max_connections=70)) as client:
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(60) as pool:
            busy = [pool.submit(client.get, server.url + "/slow?1.5") for _ in range(60)]
            wait_for(lambda: len(server.state.connections) >= 60)
            with socket.create_connection(("127.0.0.1", server.port)) as s:
                s.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
                data = answer(s)
            assert data.startswith(b"HTTP/1.1 503 ") and b"retry-after: 2" in data.lower()
            assert all(f.result().status_code == 200 for f in busy)
    assert server.limits.refused == 1


def test_install_changes_only_the_gateways_server(monkeypatch):
    """`bentoml serve` builds uvicorn.Config itself: the patched load gives the entry service the limited
    protocol and keep-alive, and leaves the worker services' servers as they were."""
    monkeypatch.setattr(uvicorn.config.Config, "load", uvicorn.config.Config.load)  # undone after the test
    monkeypatch.setattr(connections, "_installed", {})
    server_cfg = types.SimpleNamespace(header_timeout_s=3, keepalive_timeout_s=7, max_connections=100, retry_after_s=1)
    connections.install(server_cfg)
    for gateway in (True, False):
        monkeypatch.setattr(connections, "_is_gateway", lambda gateway=gateway: gateway)
        config = uvicorn.Config(app, http="h11")
        config.load()
        limited = issubclass(config.http_protocol_class, connections.LimitedConnection)
        assert limited == gateway and (config.timeout_keep_alive == 7) == gateway
        if gateway:
            assert config.http_protocol_class.limits.header_timeout_s == 3
