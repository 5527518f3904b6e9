"""Logs that trace a request: its ids on every line logged while it is handled, in text or JSON.

The gateway makes each request's id itself (`request_id` in the answer, `X-Request-Id` header): an
id chosen by the client could collide with another's or be forged into someone else's trace. An
upstream's `X-Request-Id` (a proxy's, a caller's) is kept beside it as `upstream_id`, echoed back as
`X-Upstream-Id`, so both sides' logs join. Both live in context variables for the request's task;
`RequestIdFilter`, on every handler, writes them on each line logged meanwhile, by us or a library.

`server.log_format`: `text` (BentoML's format, the ids appended as `request_id=... upstream_id=...`)
or `json` (one object a line: at, level, logger, message, request_id, upstream_id, exception).

A call to a worker carries the ids of the requests in its batch (comma-separated) as W3C baggage
(`baggage: effnet-request-ids=...,effnet-upstream-ids=...`), which BentoML's client injects through
OpenTelemetry's propagator; the worker's middleware sets them for the call, so its log lines carry
them too.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("effnet_request_id", default=None)
UPSTREAM_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("effnet_upstream_id", default=None)
MAX_UPSTREAM_ID = 128  # longer ones are cut: a header must not flood every log line
BAGGAGE_IDS, BAGGAGE_UPSTREAM = "effnet-request-ids", "effnet-upstream-ids"
MAX_BAGGAGE = 2048  # characters of ids a worker call carries (a batch of 64 ids is 2,111 with commas)


def new_id() -> str:
    return uuid.uuid4().hex


def clean_upstream(value: bytes | None) -> str | None:
    """A printable, bounded upstream id, or None."""
    if not value:
        return None
    text = value.decode("latin-1")[:MAX_UPSTREAM_ID]
    text = "".join(c for c in text if c.isprintable() and c not in "\"\\")
    return text or None


def current_ids() -> tuple[str | None, str | None]:
    return REQUEST_ID.get(), UPSTREAM_ID.get()


def bind(ids: list[tuple[str | None, str | None]]) -> None:
    """Sets the ids of a batch of requests in the current context, comma-separated."""
    rids = ",".join(r for r, _ in ids if r)[:MAX_BAGGAGE]
    ups = ",".join(u for _, u in ids if u)[:MAX_BAGGAGE]
    REQUEST_ID.set(rids or None)
    UPSTREAM_ID.set(ups or None)


@contextlib.contextmanager
def propagated() -> Iterator[None]:
    """The current ids as OpenTelemetry baggage for the calls made in the block (a worker call's headers)."""
    from opentelemetry import baggage, context

    rid, up = current_ids()
    if not rid:
        yield
        return
    ctx = baggage.set_baggage(BAGGAGE_IDS, rid)
    if up:
        ctx = baggage.set_baggage(BAGGAGE_UPSTREAM, up, context=ctx)
    token = context.attach(ctx)
    try:
        yield
    finally:
        context.detach(token)


def from_baggage(header: bytes | None) -> tuple[str | None, str | None]:
    """The ids a gateway's call carries in its `baggage` header (printable, bounded), else (None, None)."""
    if not header:
        return None, None
    found: dict[str, str] = {}
    for member in header.decode("latin-1").split(","):
        key, eq, value = member.partition("=")
        if eq and key.strip() in (BAGGAGE_IDS, BAGGAGE_UPSTREAM):
            found[key.strip()] = urllib.parse.unquote(value.split(";", 1)[0].strip())
    clean = [("".join(c for c in found.get(k, "")[:MAX_BAGGAGE] if c.isprintable() and c not in "\"\\") or None)
             for k in (BAGGAGE_IDS, BAGGAGE_UPSTREAM)]
    return clean[0], clean[1]


class RequestIdFilter(logging.Filter):
    """Puts the current request's ids on a record (`record.request_id`, `record.upstream_id`); in text format
    also at the end of its message, so that any formatter shows them."""

    def __init__(self, append: bool = True) -> None:
        super().__init__()
        self.append = append

    def filter(self, record: logging.LogRecord) -> bool:
        rid, up = REQUEST_ID.get(), UPSTREAM_ID.get()
        record.request_id, record.upstream_id = rid, up
        if self.append and rid and not getattr(record, "_effnet_ids", False):
            ids = f" request_id={rid}" + (f" upstream_id={up}" if up else "")
            record.msg = f"{record.msg}" + (ids.replace("%", "%%") if record.args else ids)
            record._effnet_ids = True  # several handlers share the record: append once
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"at": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                "level": record.levelname, "logger": record.name, "message": record.getMessage(),
                "request_id": getattr(record, "request_id", None), "upstream_id": getattr(record, "upstream_id", None)}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure(log_format: str) -> None:
    """Every handler of this process (BentoML's, set up before the app starts) gets the filter, and in
    `json` format the JSON formatter."""
    handlers = {h for name in (None, "bentoml", "uvicorn", "uvicorn.error", "uvicorn.access")
                for h in logging.getLogger(name).handlers}
    for h in handlers:
        if not any(isinstance(f, RequestIdFilter) for f in h.filters):
            h.addFilter(RequestIdFilter(append=log_format == "text"))
        if log_format == "json":
            h.setFormatter(JsonFormatter())


class RequestLogMiddleware:
    """Sets the request's ids for its task (the gateway makes them; a worker reads its caller's from the
    `baggage` header) and the log format (every process) at start."""

    def __init__(self, app: Any, log_format: str = "text", ids: bool = True) -> None:
        self.app = app
        self.log_format = log_format
        self.ids = ids

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            configure(self.log_format)
            return await self.app(scope, receive, send)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not self.ids:  # a worker: the ids its caller sent
            rid, up = from_baggage(dict(scope.get("headers") or []).get(b"baggage"))
            if rid is None:
                return await self.app(scope, receive, send)
            rid_token, up_token = REQUEST_ID.set(rid), UPSTREAM_ID.set(up)
            try:
                return await self.app(scope, receive, send)
            finally:
                REQUEST_ID.reset(rid_token)
                UPSTREAM_ID.reset(up_token)
        upstream = clean_upstream(dict(scope.get("headers") or []).get(b"x-request-id"))
        rid_token, up_token = REQUEST_ID.set(new_id()), UPSTREAM_ID.set(upstream)

        async def with_upstream(message: dict) -> None:
            if upstream and message.get("type") == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-upstream-id", upstream.encode("latin-1"))]}
            await send(message)

        try:
            await self.app(scope, receive, with_upstream)
        finally:
            REQUEST_ID.reset(rid_token)
            UPSTREAM_ID.reset(up_token)
