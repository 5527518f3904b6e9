"""Why feedback is refused: one error class per answer the gateway gives (400, 404, 409, 410, 503)."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ClientError


class FeedbackError(ClientError):
    """Feedback refused, answered with `status` by the gateway (service.errors.ClientError); nothing changed."""
    status = 400

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, type(self).status, headers)


class BadFeedback(FeedbackError):
    status = 400


class UnknownRequest(FeedbackError):
    status = 404


class DuplicateFeedback(FeedbackError):
    status = 409


class FeedbackTooLate(FeedbackError):
    status = 410


class RecordsUnavailable(FeedbackError):
    """The writer did not commit in time or the database failed: retry (a 409 then means it had been kept)."""
    status = 503

    def __init__(self, message: str) -> None:
        super().__init__(message, {"Retry-After": "1"})


def bad_feedback(request_id: Any, label: Any) -> BadFeedback | None:
    """Why a feedback item is malformed, or None: the id is a server's request id, the label a class index."""
    if not isinstance(request_id, str) or not 0 < len(request_id) <= 128:
        return BadFeedback("request_id must be the request_id of an answer (a string of 1 to 128 characters)")
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or label < 0:
        return BadFeedback(f"label must be a class index (an integer >= 0), not {label!r:.40}")
    return None
