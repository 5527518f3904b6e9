"""Connection-phase limits (service.http_limits), pure ASGI with a stand-in app (the real server:
test_gateway_http.py)."""
import asyncio

from service.http_limits import LimitsMiddleware
from tests.service.fakes import reading_app


def run_asgi(mw, path="/classify", body=b"x", headers=None, chunks=1):
    sent = []

    async def receive():
        nonlocal chunks
        chunks -= 1
        return {"type": "http.request", "body": body, "more_body": chunks > 0}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": path, "method": "POST", "headers": headers or []}
    asyncio.run(mw(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], dict(start["headers"])


def test_body_limit_refuses_by_content_length_and_while_streaming():
    mw = LimitsMiddleware(reading_app, max_body_bytes=100, max_inflight=4, retry_after_s=1)
    assert run_asgi(mw, headers=[(b"content-length", b"101")])[0] == 413
    assert run_asgi(mw, body=b"x" * 60, chunks=2)[0] == 413  # chunked: no Content-Length
    assert run_asgi(mw, body=b"x" * 50, chunks=2)[0] == 200


def test_too_many_in_flight_requests_get_429_with_retry_after():
    mw = LimitsMiddleware(reading_app, max_body_bytes=100, max_inflight=2, retry_after_s=3)
    mw.inflight = 2
    status, headers = run_asgi(mw)
    assert status == 429 and headers[b"retry-after"] == b"3"
    assert run_asgi(mw, path="/variants")[0] == 200  # other paths are not limited


def test_a_slow_upload_gets_408_and_holds_no_in_flight_slot():
    """Two requests, one slot: the slow upload waits for its body outside the slot, so the quick one
    is served meanwhile; the slow one is then answered 408 at its deadline."""
    mw = LimitsMiddleware(reading_app, max_body_bytes=100, max_inflight=1, retry_after_s=1, body_timeout_s=0.3)
    statuses = {}

    async def request(name, receive):
        sent = []

        async def send(message):
            sent.append(message)

        await mw({"type": "http", "path": "/classify", "method": "POST", "headers": []}, receive, send)
        statuses[name] = next(m["status"] for m in sent if m["type"] == "http.response.start")

    async def stalled():
        await asyncio.sleep(3600)

    async def quick():
        return {"type": "http.request", "body": b"x", "more_body": False}

    async def run():
        slow = asyncio.create_task(request("slow", stalled))
        await asyncio.sleep(0.05)
        assert mw.uploading == 1 and mw.inflight == 0
        await request("quick", quick)
        assert "slow" not in statuses
        await slow

    asyncio.run(run())
    assert statuses == {"quick": 200, "slow": 408} and mw.uploading == mw.inflight == 0


def test_too_many_uploads_get_429_and_a_client_that_leaves_gets_nothing():
    mw = LimitsMiddleware(reading_app, max_body_bytes=100, max_inflight=4, retry_after_s=2, max_uploads=1)
    mw.uploading = 1
    status, headers = run_asgi(mw)
    assert status == 429 and headers[b"retry-after"] == b"2"
    mw.uploading = 0
    sent = []

    async def gone():
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(mw({"type": "http", "path": "/classify", "method": "POST", "headers": []}, gone, send))
    assert sent == [] and mw.uploading == mw.inflight == 0


class Connection:
    """An ASGI connection as uvicorn gives it: the body, then receive() waits until the client leaves
    (or, after the answer is complete, reports a disconnect at once)."""

    def __init__(self, body=b"x"):
        self.body, self.left, self.sent = [body], asyncio.Event(), []

    async def receive(self):
        if self.body:
            return {"type": "http.request", "body": self.body.pop(), "more_body": False}
        if not any(m["type"] == "http.response.body" for m in self.sent):
            await self.left.wait()
        return {"type": "http.disconnect"}

    async def send(self, message):
        self.sent.append(message)


def test_a_request_whose_client_leaves_is_cancelled_and_frees_its_slot():
    """The work of a client that hung up must not run on: what it queued is never sent to a worker."""
    state = {}

    async def slow_app(scope, receive, send):
        await receive()
        state["started"] = True
        try:
            await asyncio.sleep(30)  # waiting for its turn at a worker
        except asyncio.CancelledError:
            state["cancelled"] = True
            raise
        await send({"type": "http.response.start", "status": 200, "headers": []})

    mw = LimitsMiddleware(slow_app, max_body_bytes=100, max_inflight=4, retry_after_s=1)
    conn = Connection()

    async def run():
        task = asyncio.create_task(mw({"type": "http", "path": "/classify", "method": "POST", "headers": []},
                                      conn.receive, conn.send))
        await asyncio.sleep(0.05)
        assert state == {"started": True} and mw.inflight == 1
        conn.left.set()
        await asyncio.wait_for(task, 2)  # returns, without raising, soon after the client left

    asyncio.run(run())
    assert state == {"started": True, "cancelled": True} and mw.inflight == 0 and conn.sent == []


def test_a_request_that_was_answered_is_not_cancelled_by_the_disconnect_after_it():
    finished = []

    async def app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        await asyncio.sleep(0.05)  # work after the answer (metrics...): must not be cancelled
        finished.append(True)

    mw = LimitsMiddleware(app, max_body_bytes=100, max_inflight=4, retry_after_s=1)
    conn = Connection()
    asyncio.run(mw({"type": "http", "path": "/classify", "method": "POST", "headers": []}, conn.receive, conn.send))
    assert finished == [True] and conn.sent[0]["status"] == 200 and mw.inflight == 0
