"""The tallies of several Locust workers as one: what a single process would have counted.

A distributed step (`effnet loadtest --locust-workers N`) counts its answers in N worker processes;
each sends its tally (`Tally.to_json()` in locustfile.py) to the master, which writes their merge.
Counts add up, nested counters add up key by key, labels (route, model) are the same everywhere.
"""
from __future__ import annotations

from typing import Any

def _add(into: dict, other: dict) -> None:
    """Add `other`'s counts into `into`: numbers add, dicts recurse, labels keep the first non-empty value."""
    for key, value in other.items():
        if isinstance(value, dict):
            _add(into.setdefault(key, {}), value)
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            if not into.get(key):
                into[key] = value
        else:
            into[key] = into.get(key, 0) + value


def merge_tallies(tallies: list[dict[str, Any]]) -> dict[str, Any]:
    """One tally from several; `workers` says how many were merged."""
    out: dict[str, Any] = {"variants": {}, "errors": {}, "bad_inputs": {}, "split": {}, "clients": 0,
                           "sticky_violations": 0}
    for tally in tallies:
        _add(out, {k: v for k, v in tally.items() if k != "workers"})
    out["workers"] = len(tallies)
    return out
