"""Connection-phase limits on the classify endpoints, before the app runs (pure ASGI).

- 413: the body is above `server.max_body_mb` (checked on Content-Length and while streaming);
- 408: the body did not arrive within `server.body_timeout_s`;
- 429 + Retry-After: more than `server.max_inflight` classify requests in the gateway at once, or more
  than `server.max_uploads` still receiving their bodies;
- a client that leaves before its answer has its request cancelled (counted as 499 by the handler).
"""
from __future__ import annotations

import asyncio
from typing import Any

from . import metrics
from .errors import error_response, request_id

CLASSIFY_PATHS = ("/classify", "/classify_batch")


class LimitsMiddleware:
    """Body size, upload time and in-flight limits on the classify endpoints, before the app runs.

    Pure ASGI, so it can refuse on Content-Length without reading, and count bytes of chunked bodies.
    The whole body is received here before the request takes one of the `max_inflight` slots that
    bound the gateway's work: a client that uploads slowly (or never finishes) holds only an upload
    place, and is answered 408 when `body_timeout_s` has passed; otherwise clients that send headers and
    stop would hold every slot until BentoML's timeout, and every other client would get 429.
    """

    def __init__(self, app: Any, max_body_bytes: int, max_inflight: int, retry_after_s: int,
                 body_timeout_s: float = 30.0, max_uploads: int = 256) -> None:
        self.app = app
        self.max_body = max_body_bytes
        self.max_inflight = max_inflight
        self.retry_after = str(retry_after_s)
        self.body_timeout = body_timeout_s
        self.max_uploads = max_uploads
        self.inflight = 0
        self.uploading = 0

    async def _refuse(self, send: Any, status: int, message: str, endpoint: str, headers: dict | None = None) -> None:
        metrics.REQUESTS.labels(endpoint, "none", "none", str(status)).inc()
        await error_response(request_id(), status, message, headers)({"type": "http"}, None, send)

    async def _receive_body(self, receive: Any) -> tuple[list[dict] | None, str | None]:
        """Every body message, or None and why not: "large", "slow", or "gone" (the client left)."""
        messages: list[dict] = []
        received = 0
        try:
            async with asyncio.timeout(self.body_timeout):  # one deadline for the whole body, no task per chunk
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        return None, "gone"
                    received += len(message.get("body", b""))
                    if received > self.max_body:
                        return None, "large"
                    messages.append(message)
                    if not message.get("more_body"):
                        return messages, None
        except TimeoutError:
            return None, "slow"

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in CLASSIFY_PATHS or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        endpoint = scope["path"].lstrip("/")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await self._refuse(send, 413, f"request body of {int(length):,} bytes is above the limit of "
                                      f"{self.max_body:,} bytes", endpoint)
        if self.inflight >= self.max_inflight or self.uploading >= self.max_uploads:
            busy = (f"{self.inflight} requests in flight" if self.inflight >= self.max_inflight
                    else f"{self.uploading} uploads in progress")
            return await self._refuse(send, 429, f"overloaded: {busy}; retry later",
                                      endpoint, {"Retry-After": self.retry_after})
        self.uploading += 1
        metrics.IN_GATEWAY.labels("uploading").inc()
        try:
            body, problem = await self._receive_body(receive)
        finally:
            self.uploading -= 1
            metrics.IN_GATEWAY.labels("uploading").dec()
        if problem == "large":
            return await self._refuse(send, 413, f"request body is above the limit of {self.max_body:,} bytes", endpoint)
        if problem == "slow":
            return await self._refuse(send, 408, f"the request body did not arrive within {self.body_timeout:g} s; "
                                      "send it at once, or a smaller image", endpoint)
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
