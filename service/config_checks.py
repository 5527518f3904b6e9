"""The checks every section of the serving configuration uses: its error, known keys, numbers."""
from __future__ import annotations

import math
from typing import Any


class ConfigError(ValueError):
    """The serving configuration is invalid; the message names the key or variant."""


def check_keys(where: str, d: Any, allowed: set[str], required: set[str] = frozenset()) -> dict:
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    unknown = set(d) - allowed
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    missing = required - set(d)
    if missing:
        raise ConfigError(f"{where}: missing key(s) {sorted(missing)}")
    return d


def check_number(where: str, value: Any, *, integer: bool = False, minimum: float = 0, positive: bool = False) -> Any:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not math.isfinite(value) or value < minimum or (positive and value <= 0):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{where}: expected {kind} {'> 0' if positive else f'>= {minimum}'}, got {value!r}")
    return value
