"""The error answer every endpoint gives: `{"error": message, "request_id": id}` with its status."""
from __future__ import annotations

import uuid

from starlette.responses import JSONResponse


class ClientError(Exception):
    """Answered with `status` and the message as {"error": ...}; `headers` such as Retry-After."""

    def __init__(self, message: str, status: int = 400, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


def request_id() -> str:
    return uuid.uuid4().hex


def error_response(rid: str, status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "request_id": rid}, status_code=status,
                        headers={"X-Request-Id": rid, **(headers or {})})


def retry_later(message: str, retry_after_s: int, status: int = 503) -> ClientError:
    """A refusal that tells the client when to try again (429/503 + Retry-After)."""
    return ClientError(message, status, {"Retry-After": str(retry_after_s)})
