"""Lingering close after an early refusal and the byte budget of buffered bodies (service.http_limits),
pure ASGI with a stand-in app; the real server: test_connection_limits_http.py."""
import asyncio
import json

import pytest

from service.config import ConfigError, parse_config
from service.http_limits import BodyBudget, LimitsMiddleware, discard_body
from tests.service.fakes import reading_app


class Upload:
    """A client sending `chunks` body messages of `size` bytes, as uvicorn hands them over; after the
    answer is complete, receive() reports a disconnect (as uvicorn does)."""

    def __init__(self, chunks=4, size=100, stall_after=None, headers=None):
        self.chunks, self.size, self.stall_after = chunks, size, stall_after
        self.read = 0  # body messages received by the app
        self.sent = []
        self.headers = headers or []

    async def receive(self):
        if any(m["type"] == "http.response.body" and not m.get("more_body") for m in self.sent):
            return {"type": "http.disconnect"}
        if self.stall_after is not None and self.read >= self.stall_after:
            await asyncio.sleep(3600)
        self.read += 1
        return {"type": "http.request", "body": b"x" * self.size, "more_body": self.read < self.chunks}

    async def send(self, message):
        self.sent.append(message)

    def run(self, mw):
        scope = {"type": "http", "path": "/classify", "method": "POST", "headers": self.headers}
        asyncio.run(mw(scope, self.receive, self.send))
        return self

    @property
    def status(self):
        return next(m["status"] for m in self.sent if m["type"] == "http.response.start")

    @property
    def headers_sent(self):
        return dict(next(m["headers"] for m in self.sent if m["type"] == "http.response.start"))

    @property
    def body(self):
        return json.loads(b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body"))


def test_a_refusal_by_content_length_reads_the_rest_of_the_body_before_it_completes_the_answer():
    """uvicorn closes a `Connection: close` connection at the last body message, and a close with unread
    data resets it: the whole answer goes first, then the body is drained, then the empty last message."""
    mw = LimitsMiddleware(reading_app, max_body_bytes=100, max_inflight=4, retry_after_s=1)
    up = Upload(chunks=5, headers=[(b"content-length", b"500")]).run(mw)
    assert up.status == 413 and "above the limit of 100 bytes" in up.body["error"]
    assert up.read == 5  # every body message was read
    assert up.headers_sent[b"connection"] == b"close"
    bodies = [m for m in up.sent if m["type"] == "http.response.body"]
    assert bodies[0]["more_body"] and bodies[0]["body"] and bodies[-1] == {
        "type": "http.response.body", "body": b"", "more_body": False}


def test_a_refusal_while_streaming_and_a_refusal_for_overload_drain_the_body_too():
    mw = LimitsMiddleware(reading_app, max_body_bytes=250, max_inflight=4, retry_after_s=1)
    up = Upload(chunks=6).run(mw)  # chunked: over the limit at the third message
    assert up.status == 413 and up.read == 6
    mw.inflight = 4
    up = Upload(chunks=3).run(mw)
    assert up.status == 429 and up.read == 3 and up.headers_sent[b"retry-after"] == b"1"


def test_a_client_that_expects_100_continue_is_answered_without_waiting_for_a_body():
    mw = LimitsMiddleware(reading_app, max_body_bytes=100, max_inflight=4, retry_after_s=1)
    up = Upload(chunks=5, headers=[(b"content-length", b"500"), (b"expect", b"100-continue")]).run(mw)
    assert up.status == 413 and up.read == 0


def test_draining_stops_at_its_byte_and_time_bounds():
    up = Upload(chunks=10**6, size=1000)
    assert asyncio.run(discard_body(up.receive, max_bytes=50_000, max_s=5)) == 51_000
    stalled = Upload(chunks=10, stall_after=2)  # it would wait an hour for the third message
    assert asyncio.run(discard_body(stalled.receive, max_bytes=10**9, max_s=0.2)) == 200
    assert asyncio.run(discard_body(Upload(chunks=10, stall_after=2).receive, max_bytes=10**9, max_s=60,
                                    idle_s=0.2)) == 200


def test_draining_lets_a_slow_client_that_keeps_sending_finish_past_the_idle_bound():
    class Slow(Upload):
        async def receive(self):
            await asyncio.sleep(0.05)  # each message comes sooner than idle_s, all of them later than it
            return await super().receive()

    assert asyncio.run(discard_body(Slow(chunks=8).receive, max_bytes=10**9, max_s=60, idle_s=0.2)) == 800


def test_a_body_that_would_overfill_the_byte_budget_gets_429_and_its_room_is_returned():
    """By Content-Length at once, and while streaming for a body without one; the room a request held is
    returned once it is answered, whatever the answer."""
    mw = LimitsMiddleware(reading_app, max_body_bytes=1000, max_inflight=4, retry_after_s=2, max_buffered_bytes=1000)
    mw.buffered.used = 600  # other requests' bodies
    up = Upload(chunks=5, headers=[(b"content-length", b"500")]).run(mw)
    assert up.status == 429 and up.headers_sent[b"retry-after"] == b"2" and up.read == 5
    assert "MiB of request bodies buffered" in up.body["error"]
    up = Upload(chunks=5).run(mw)  # 100 bytes a message: the fifth would go above the budget
    assert up.status == 429 and mw.buffered.used == 600
    mw.buffered.used = 0
    assert Upload(chunks=5).run(mw).status == 200 and mw.buffered.used == 0
    assert Upload(chunks=5, headers=[(b"content-length", b"500")]).run(mw).status == 200
    assert mw.buffered.used == 0


def test_a_body_holds_its_room_until_its_answer():
    seen = {}

    async def app(scope, receive, send):
        await reading_app(scope, receive, send)
        seen["used"] = mw.buffered.used

    mw = LimitsMiddleware(app, max_body_bytes=1000, max_inflight=4, retry_after_s=1, max_buffered_bytes=10_000)
    assert Upload(chunks=3).run(mw).status == 200
    assert seen["used"] == 300 and mw.buffered.used == 0


def test_the_budget_refuses_only_what_does_not_fit():
    budget = BodyBudget(100)
    a, b = budget.hold(), budget.hold()
    assert a.grow_to(60) and not b.grow_to(50) and b.grow_to(40) and budget.used == 100
    a.release()
    assert budget.used == 40 and b.grow_to(90) and budget.used == 90


def test_the_connection_and_buffer_keys_are_read_and_checked():
    from tests.service.fakes import CFG

    cfg = parse_config({**CFG, "server": {"header_timeout_s": 2.5, "keepalive_timeout_s": 1, "max_connections": 100,
                                          "max_buffered_mb": 64}})
    s = cfg.server
    assert (s.header_timeout_s, s.keepalive_timeout_s, s.max_connections, s.max_buffered_bytes) == (2.5, 1, 100, 64 << 20)
    with pytest.raises(ConfigError, match="max_buffered_mb .* must be at least server.max_body_mb"):
        parse_config({**CFG, "server": {"max_buffered_mb": 5, "max_body_mb": 10}})
    with pytest.raises(ConfigError, match="server.max_connections: expected an integer"):
        parse_config({**CFG, "server": {"max_connections": 1.5}})
