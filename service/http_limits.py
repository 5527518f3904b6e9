"""Connection-phase limits on the endpoints that take images (classify, classify_batch, /v2 infer), before
the app runs (pure ASGI).

- 413: the body is above `server.max_body_mb` (checked on Content-Length and while streaming);
- 408: the body did not arrive within `server.body_timeout_s`;
- 429 + Retry-After: more than `server.max_inflight` classify requests in the gateway at once, more
  than `server.max_uploads` still receiving their bodies, or a body that would take the bodies buffered
  in the gateway above `server.max_buffered_mb`;
- a refusal sent before the whole body arrived is followed by a lingering close (`answer_and_linger`);
- a client that leaves before its answer has its request cancelled (counted as 499 by the handler).
"""
from __future__ import annotations

import asyncio
import re
from typing import Any

from . import metrics
from .errors import error_response, request_id

CLASSIFY_PATHS = ("/classify", "/classify_batch")
# The Open Inference Protocol's infer (service/oip.py) carries images too: the same limits apply to it.
INFER_PATH = re.compile(r"/v2/models/[^/]+(/versions/[^/]+)?/infer")


def limited_endpoint(method: str, path: str) -> str | None:
    """The endpoint whose uploads these limits guard ("classify", "classify_batch", "infer"), else None;
    also the bounded `endpoint` label of the limits' metrics."""
    if method != "POST":
        return None
    if path in CLASSIFY_PATHS:
        return path.lstrip("/")
    return "infer" if INFER_PATH.fullmatch(path) else None
# Lingering close after an early refusal, as nginx's lingering_close: what the client still sends is read
# and dropped, so that a client that reads only once it has sent everything (Python's urllib) sees the
# answer instead of a reset. As nginx: a total bound (lingering_time), a bound on each wait for more
# (lingering_timeout: a client that stops sending is let go), and a byte bound: in a burst of big
# uploads each body arrives slowly while its client is still sending (256 x 10 MiB: 50 resets with 5 s
# in all, none with these bounds; benchmarks/RESULTS.md, chaos). The wait for more is 15 s: with big bodies
# parsed beside the event loop (service/forms.py), 224 of 231 refused uploads were reset with 5 s.
LINGER_BYTES = 64 * 1024 * 1024
LINGER_S = 30.0
LINGER_IDLE_S = 15.0


async def discard_body(receive: Any, max_bytes: int = LINGER_BYTES, max_s: float = LINGER_S,
                       idle_s: float = LINGER_IDLE_S) -> int:
    """Receive and drop the rest of a request body, up to `max_bytes` or `max_s` in all, and no longer
    than `idle_s` waiting for any one message; returns the bytes read."""
    read = 0
    try:
        async with asyncio.timeout(max_s):
            while read <= max_bytes:
                async with asyncio.timeout(idle_s):
                    message = await receive()
                if message["type"] != "http.request":
                    break
                read += len(message.get("body", b""))
                if not message.get("more_body"):
                    break
    except TimeoutError:
        pass
    return read


async def answer_and_linger(response: Any, receive: Any, send: Any) -> None:
    """Send a complete answer, then drop the rest of the body (bounded), then close the connection.

    Closing a socket with unread data makes the kernel send a reset, which destroys the answer the
    client has not read yet: a client that sends its whole body before reading (urllib, and curl or
    requests on slow links) then sees "connection reset" instead of a 413. Draining must happen before
    the answer is complete, because uvicorn closes a `Connection: close` connection as soon as the last
    body message is sent and answers every later receive() with a disconnect. So the answer goes out
    whole, with its Content-Length, on a message that says more follows (the client can read it at
    once); the body is drained; an empty last message then lets uvicorn close a connection that has
    nothing unread.
    """
    await send({"type": "http.response.start", "status": response.status_code,
                "headers": [*response.raw_headers, (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": response.body, "more_body": True})
    await discard_body(receive)
    await send({"type": "http.response.body", "body": b"", "more_body": False})


class BodyBudget:
    """Bytes of request bodies buffered in the gateway at once, across requests (`max_buffered_mb`).

    A body takes room as it arrives (at once for its Content-Length) and keeps it until its request
    is answered: the body, its parsed form and its decoded images live that long.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0

    def hold(self) -> "BodyHold":
        return BodyHold(self)


class BodyHold:
    """One request's share of a BodyBudget."""

    def __init__(self, budget: BodyBudget) -> None:
        self.budget, self.bytes = budget, 0

    def grow_to(self, n: int) -> bool:
        """Hold `n` bytes in all; False (holding what it held) if the budget has no room for them."""
        extra = n - self.bytes
        if extra > 0:
            if self.budget.used + extra > self.budget.capacity:
                return False
            self.budget.used += extra
            self.bytes = n
        return True

    def release(self) -> None:
        self.budget.used -= self.bytes
        self.bytes = 0


class LimitsMiddleware:
    """Body size, upload time and in-flight limits on the classify endpoints, before the app runs.

    Pure ASGI, so it can refuse on Content-Length without reading, and count bytes of chunked bodies.
    The whole body is received here before the request takes one of the `max_inflight` slots that
    bound the gateway's work: a client that uploads slowly (or never finishes) holds only an upload
    place, and is answered 408 when `body_timeout_s` has passed; otherwise clients that send headers and
    stop would hold every slot until BentoML's timeout, and every other client would get 429.
    """

    def __init__(self, app: Any, max_body_bytes: int, max_inflight: int, retry_after_s: int,
                 body_timeout_s: float = 30.0, max_uploads: int = 256, max_buffered_bytes: int | None = None) -> None:
        self.app = app
        self.max_body = max_body_bytes
        self.max_inflight = max_inflight
        self.retry_after = str(retry_after_s)
        self.body_timeout = body_timeout_s
        self.max_uploads = max_uploads
        self.inflight = 0
        self.uploading = 0
        self.buffered = BodyBudget(max_buffered_bytes or 256 * max_body_bytes)

    async def _refuse(self, send: Any, status: int, message: str, endpoint: str, headers: dict | None = None,
                      unread: Any = None) -> None:
        """Answer `status`; `unread`: the receive() of a body not (wholly) read yet, then drained first."""
        metrics.REQUESTS.labels(endpoint, "none", "none", str(status)).inc()
        response = error_response(request_id(), status, message, headers)
        if unread is None:
            return await response({"type": "http"}, None, send)
        await answer_and_linger(response, unread, send)

    def _full(self) -> str:
        return (f"overloaded: {self.buffered.used / 2**20:,.1f} MiB of request bodies buffered (limit "
                f"{self.buffered.capacity / 2**20:,.0f} MiB); retry later")

    async def _receive_body(self, receive: Any, hold: BodyHold | None = None) -> tuple[list[dict] | None, str | None]:
        """Every body message, or None and why not: "large", "full" (no room in the byte budget), "slow",
        or "gone" (the client left)."""
        messages: list[dict] = []
        received = 0
        hold = hold or self.buffered.hold()
        try:
            async with asyncio.timeout(self.body_timeout):  # one deadline for the whole body, no task per chunk
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        return None, "gone"
                    received += len(message.get("body", b""))
                    if received > self.max_body:
                        return None, "large"
                    if not hold.grow_to(received):
                        return None, "full"
                    messages.append(message)
                    if not message.get("more_body"):
                        return messages, None
        except TimeoutError:
            return None, "slow"

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        endpoint = limited_endpoint(scope["method"], scope["path"]) if scope["type"] == "http" else None
        if endpoint is None:
            return await self.app(scope, receive, send)
        hold = self.buffered.hold()
        try:
            await self._classify(scope, receive, send, hold, endpoint)
        finally:
            hold.release()

    async def _classify(self, scope: Any, receive: Any, send: Any, hold: BodyHold, endpoint: str) -> None:
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        # A client that sent `Expect: 100-continue` sends no body after an early answer: nothing to drain.
        unread = None if headers.get(b"expect", b"").lower() == b"100-continue" else receive
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await self._refuse(send, 413, f"request body of {int(length):,} bytes is above the limit of "
                                      f"{self.max_body:,} bytes", endpoint, unread=unread)
        if self.inflight >= self.max_inflight or self.uploading >= self.max_uploads:
            busy = (f"{self.inflight} requests in flight" if self.inflight >= self.max_inflight
                    else f"{self.uploading} uploads in progress")
            return await self._refuse(send, 429, f"overloaded: {busy}; retry later",
                                      endpoint, {"Retry-After": self.retry_after}, unread=unread)
        if length is not None and length.isdigit() and not hold.grow_to(int(length)):
            return await self._refuse(send, 429, self._full(), endpoint, {"Retry-After": self.retry_after},
                                      unread=unread)
        self.uploading += 1
        metrics.IN_GATEWAY.labels("uploading").inc()
        try:
            body, problem = await self._receive_body(receive, hold)
        finally:
            self.uploading -= 1
            metrics.IN_GATEWAY.labels("uploading").dec()
        if problem == "large":
            return await self._refuse(send, 413, f"request body is above the limit of {self.max_body:,} bytes", endpoint,
                                      unread=receive)
        if problem == "full":
            return await self._refuse(send, 429, self._full(), endpoint, {"Retry-After": self.retry_after},
                                      unread=receive)
        if problem == "slow":
            return await self._refuse(send, 408, f"the request body did not arrive within {self.body_timeout:g} s; "
                                      "send it at once, or a smaller image", endpoint, unread=receive)
        if problem == "gone":
            return None  # nobody to answer
        if self.inflight >= self.max_inflight:  # the slots may have filled while this body arrived
            return await self._refuse(send, 429, f"overloaded: {self.inflight} requests in flight; retry later",
                                      endpoint, {"Retry-After": self.retry_after})

        # The body is in; from now on the client's connection only says whether it went away. A request
        # whose client left is cancelled, and what it queued is never sent: its work would delay the
        # live requests behind it by seconds.
        gone = asyncio.Event()
        answered = False

        async def watch() -> None:
            # After the body, an ASGI server's receive() waits for the disconnect; uvicorn also reports
            # one once the answer is complete, which is no reason to cancel anything.
            if (await receive())["type"] == "http.disconnect" and not answered:
                gone.set()

        async def replay() -> Any:
            if body:
                return body.pop(0)
            await gone.wait()
            return {"type": "http.disconnect"}

        async def sending(message: dict) -> None:
            nonlocal answered
            if message["type"] == "http.response.body" and not message.get("more_body"):
                answered = True  # before the send: the watcher may wake while it completes
            await send(message)

        self.inflight += 1
        metrics.IN_GATEWAY.labels("processing").inc()
        handler = asyncio.ensure_future(self.app(scope, replay, sending))
        watcher = asyncio.ensure_future(watch())
        try:
            await asyncio.wait((handler, watcher), return_when=asyncio.FIRST_COMPLETED)
            if gone.is_set():  # the client went away before its answer: nobody will read it
                handler.cancel()
            try:
                await handler
            except asyncio.CancelledError:
                if not gone.is_set() or asyncio.current_task().cancelling():
                    raise
        finally:
            watcher.cancel()
            handler.cancel()  # a no-op once done; else (this middleware cancelled) it must not run on alone
            self.inflight -= 1
            metrics.IN_GATEWAY.labels("processing").dec()
