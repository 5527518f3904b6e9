"""The error answer every endpoint gives: `{"error": message, "request_id": id}` with its status."""
from __future__ import annotations

import uuid

from starlette.responses import JSONResponse

from .request_log import REQUEST_ID


class ClientError(Exception):
    """Answered with `status` and the message as {"error": ...}; `headers` such as Retry-After."""

    def __init__(self, message: str, status: int = 400, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


def request_id() -> str:
    """The id of the request being handled (service.request_log sets it as the request arrives, so that the
    answer and every log line about it carry the same one), else a new one."""
    return REQUEST_ID.get() or uuid.uuid4().hex


def error_response(rid: str, status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "request_id": rid}, status_code=status,
                        headers={"X-Request-Id": rid, **(headers or {})})


def retry_later(message: str, retry_after_s: int, status: int = 503) -> ClientError:
    """A refusal that tells the client when to try again (429/503 + Retry-After)."""
    return ClientError(message, status, {"Retry-After": str(retry_after_s)})
