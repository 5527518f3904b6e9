"""Logs that trace a request: its ids on every line logged while it is handled, in text or JSON.

The gateway makes each request's id itself (`request_id` in the answer, `X-Request-Id` header): an
id chosen by the client could collide with another's or be forged into someone else's trace. An
upstream's `X-Request-Id` (a proxy's, a caller's) is kept beside it as `upstream_id`, echoed back as
`X-Upstream-Id`, so both sides' logs join. Both live in context variables for the request's task;
`RequestIdFilter`, on every handler, writes them on each line logged meanwhile, by us or a library.

`server.log_format`: `text` (BentoML's format, the ids appended as `request_id=... upstream_id=...`)
or `json` (one object a line: at, level, logger, message, request_id, upstream_id, exception).
"""
from __future__ import annotations

import contextvars
import json
import logging
import time
import uuid
from typing import Any

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("effnet_request_id", default=None)
UPSTREAM_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("effnet_upstream_id", default=None)
MAX_UPSTREAM_ID = 128  # longer ones are cut: a header must not flood every log line


def new_id() -> str:
    return uuid.uuid4().hex


def clean_upstream(value: bytes | None) -> str | None:
    """A printable, bounded upstream id, or None."""
    if not value:
        return None
    text = value.decode("latin-1")[:MAX_UPSTREAM_ID]
    text = "".join(c for c in text if c.isprintable() and c not in "\"\\")
    return text or None


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
    """Sets the request's ids for its task (gateway) and the log format (every process) at start."""

    def __init__(self, app: Any, log_format: str = "text", ids: bool = True) -> None:
        self.app = app
        self.log_format = log_format
        self.ids = ids

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            configure(self.log_format)
            return await self.app(scope, receive, send)
        if scope["type"] != "http" or not self.ids:
            return await self.app(scope, receive, send)
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
