"""An experiment over time: each variant's cumulative labelled answers and correct ones, bucket by bucket.

`GET /experiments/{route}?history=1` answers with it, and `effnet experiment ROUTE --png` draws it: the
accuracy with its 95% interval as feedback came in, which shows whether an interval is still narrowing or
a difference has settled. Buckets are by the time the feedback was committed (when the evidence arrived),
not by the answer's time; `max_points` bounds the answer however long the experiment has run.
"""
from __future__ import annotations

import math
from typing import Any

from .stats import wilson


def bucket_width(first: float, last: float, max_points: int) -> float:
    """Whole seconds per bucket so that the span from `first` to `last` fits in at most `max_points` buckets."""
    if max_points < 1:
        raise ValueError(f"max_points must be at least 1, not {max_points}")
    return float(max(1, math.ceil((last - first + 1) / max_points)))


def history(db: Any, route: str, max_points: int = 60) -> dict[str, list[dict]]:
    """Per variant of `route` (shadows as `VARIANT (shadow)`): points of (t, labelled, correct, accuracy, low,
    high), cumulative, one per bucket in which the variant received feedback. `db` is the records' `Db`."""
    span = db.run("SELECT MIN(f.at), MAX(f.at) FROM feedback f CROSS JOIN requests r "
                  "WHERE r.request_id = f.request_id AND r.route = ?", (route,)).fetchone()
    if not span or span[0] is None:
        return {}
    first, last = float(span[0]), float(span[1])
    width = bucket_width(first, last, max_points)
    rows = db.run(
        "SELECT r.variant, CASE WHEN r.shadow_of IS NULL THEN 0 ELSE 1 END, "
        "CAST(FLOOR((f.at - ?) / ?) AS INTEGER) AS b, COUNT(*), SUM(f.correct) FROM feedback f "
        "CROSS JOIN requests r WHERE r.request_id = f.request_id AND r.route = ? GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
        (first, width, route)).fetchall()
    out: dict[str, list[dict]] = {}
    totals: dict[str, tuple[int, int]] = {}
    for variant, shadow, bucket, n, correct in rows:
        name = f"{variant} (shadow)" if shadow else variant
        labelled, right = totals.get(name, (0, 0))
        labelled, right = labelled + int(n), right + int(correct)
        totals[name] = (labelled, right)
        low, high = wilson(right, labelled)
        out.setdefault(name, []).append({"t": first + (int(bucket) + 1) * width, "labelled": labelled,
                                         "correct": right, "accuracy": right / labelled, "low": low, "high": high})
    return out
