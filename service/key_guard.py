"""Client keys and their quotas on the inference and feedback endpoints, before the body is read (pure ASGI).

- 401: no key, or a key that is not in the keys file (one message for both: no hint which was wrong);
- 429 + Retry-After: the key is above its requests a second or its requests at once; another key's
  requests are counted apart and go on;
- every other endpoint (health, metrics, the admin endpoints with their token) is passed through as it is.

Installed only when a keys file is configured (service/keys.py), so a local `make serve` has no keys.
The key's name, never the key, is what metrics and logs see; the sticky-split client id (`X-Client-Id`)
is a separate header that keys do not touch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import metrics
from .errors import error_response, request_id
from .http_limits import INFER_PATH, answer_and_linger
from .keys import KeyRing, presented_key
from .quota import Quotas

GUARDED_PATHS = ("/classify", "/classify_batch", "/feedback")
UNAUTHORIZED = ("send a valid API key as `X-Api-Key: KEY` or `Authorization: Bearer KEY`; this endpoint "
                "needs one")
OTHER = "other"  # the label of key names past server.api_key_metric_names
NONE = "none"  # the label of requests with no valid key


def guarded(method: str, path: str) -> bool:
    """Whether a request needs a client key: the inference and feedback endpoints."""
    return method == "POST" and (path in GUARDED_PATHS or INFER_PATH.fullmatch(path) is not None)


class MetricNames:
    """Key names as metric labels: the first `limit` names seen keep their own, later ones are "other",
    so the series stay bounded however many keys the file lists (and however often it changes)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.named = limit, set()

    def __call__(self, name: str) -> str:
        if name in self.named:
            return name
        if len(self.named) < self.limit:
            self.named.add(name)
            return name
        return OTHER


class KeysMiddleware:
    """401 without a valid key, 429 past the key's quota, on the guarded endpoints; the rest untouched."""

    def __init__(self, app: Any, path: str | Path, poll_s: float = 1.0, requests_per_s: float = 0,
                 concurrent: int = 0, retry_after_s: int = 1, metric_names: int = 50) -> None:
        self.app = app
        self.ring = KeyRing(Path(path), poll_s)
        self.quotas = Quotas(requests_per_s, concurrent, retry_after_s)
        self.label = MetricNames(metric_names)

    async def _refuse(self, receive: Any, send: Any, headers: dict, status: int, message: str,
                      extra: dict | None = None) -> None:
        response = error_response(request_id(), status, message, extra)
        if headers.get(b"expect", b"").lower() == b"100-continue":  # no body follows an early answer
            return await response({"type": "http"}, None, send)
        await answer_and_linger(response, receive, send)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not guarded(scope["method"], scope["path"]):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        key = self.ring.find(presented_key(headers))
        if key is None:
            metrics.KEY_REQUESTS.labels(NONE, "unauthorized").inc()
            return await self._refuse(receive, send, headers, 401, UNAUTHORIZED, {"WWW-Authenticate": "Bearer"})
        label = self.label(key.name)
        refused = self.quotas.admit(key.name, key.requests_per_s, key.concurrent)
        if refused:
            metrics.KEY_REQUESTS.labels(label, f"over_{refused.over}").inc()
            return await self._refuse(receive, send, headers, 429, refused.message,
                                      {"Retry-After": str(refused.retry_after_s)})
        metrics.KEY_REQUESTS.labels(label, "admitted").inc()
        scope.setdefault("state", {})["api_key"] = key.name  # for handlers and logs: the name, never the key
        try:
            await self.app(scope, receive, send)
        finally:
            self.quotas.release(key.name)
