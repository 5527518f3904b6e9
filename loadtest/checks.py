"""What a correct /classify answer looks like (the API of service/), checked on every answer under load.

Kept apart from the locustfile: importing Locust monkey-patches the whole process with gevent, which
tests and the CLI must not suffer.
"""
from __future__ import annotations

ANSWER_KEYS = {"request_id", "route", "variant", "model", "assignment", "predictions", "latency_ms"}
PREDICTION_KEYS = {"label", "index", "score"}


def check_answer(body, *, variant: str | None, route: str | None, assignment: str | None, top_k: int,
                 known_variants) -> str | None:
    """The first thing wrong with an answer, or None."""
    if not isinstance(body, dict):
        return "schema: answer is not a JSON object"
    missing = ANSWER_KEYS - set(body)
    if missing:
        return f"schema: missing {sorted(missing)}"
    preds = body["predictions"]
    if not isinstance(preds, list) or not preds or len(preds) > top_k:
        return f"schema: {len(preds) if isinstance(preds, list) else '?'} predictions for top_k={top_k}"
    if any(not isinstance(p, dict) or PREDICTION_KEYS - set(p) for p in preds):
        return "schema: prediction without label/index/score"
    scores = [p["score"] for p in preds]
    if scores != sorted(scores, reverse=True):
        return "schema: predictions not highest first"
    if body["variant"] not in known_variants:
        return f"unknown variant {body['variant']!r} answered"
    if variant and body["variant"] != variant:
        return f"asked for {variant}, answered by {body['variant']}"
    if route and body["route"] != route:
        return f"asked route {route}, answered by route {body['route']}"
    if assignment and body["assignment"] != assignment:
        return f"assignment {body['assignment']!r}, expected {assignment!r}"
    return None
