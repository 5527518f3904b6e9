"""Per-key quotas: requests a second (a token bucket) and requests at once, each key on its own.

Pure bookkeeping with an injectable clock, so it is tested without a server. The gateway is one process
(`workers=1`), so one Quotas object sees every request of a key.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any


class TokenBucket:
    """`rate` tokens a second, holding at most `capacity` (at least one request's worth): a key may
    send a second's worth at once after a pause, and `rate` a second on average."""

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate, self.capacity = rate, max(1.0, capacity)
        self.tokens, self.at = self.capacity, now

    def take(self, now: float) -> float:
        """Take one token: 0 when taken, else the seconds until one is there (nothing taken)."""
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@dataclass(frozen=True)
class Refusal:
    """Why a key's request is refused: `over` ("rate" or "concurrent") and when to try again."""

    over: str
    message: str
    retry_after_s: int


class Quotas:
    """Each key's bucket and requests in flight. `rate`/`concurrent` are the defaults for keys whose line
    sets none; 0 means unlimited. A key's bucket is rebuilt when its rate changes in the file."""

    def __init__(self, rate: float = 0, concurrent: int = 0, retry_after_s: int = 1,
                 clock: Any = time.monotonic) -> None:
        self.rate, self.concurrent, self.retry_after_s, self.clock = rate, concurrent, retry_after_s, clock
        self.buckets: dict[str, TokenBucket] = {}
        self.inflight: dict[str, int] = {}

    def admit(self, name: str, rate: float | None = None, concurrent: int | None = None) -> Refusal | None:
        """Count one request of key `name` in, or say why not; an admitted request must be `release`d."""
        rate = self.rate if rate is None else rate
        concurrent = self.concurrent if concurrent is None else concurrent
        if concurrent and self.inflight.get(name, 0) >= concurrent:
            return Refusal("concurrent", f"this key has {concurrent} requests in flight, its limit; "
                                         "send the next when one is answered", self.retry_after_s)
        if rate:
            bucket = self.buckets.get(name)
            now = self.clock()
            if bucket is None or bucket.rate != rate:
                bucket = self.buckets[name] = TokenBucket(rate, rate, now)
            wait = bucket.take(now)
            if wait:
                return Refusal("rate", f"this key is above its quota of {rate:g} requests a second; retry later",
                               max(1, math.ceil(wait)))
        self.inflight[name] = self.inflight.get(name, 0) + 1
        return None

    def release(self, name: str) -> None:
        left = self.inflight.get(name, 0) - 1
        if left > 0:
            self.inflight[name] = left
        else:
            self.inflight.pop(name, None)
