"""Admission per variant: a busy or failed variant never pushes other routes into 429.

Each variant has places of its own (`variants.X.max_inflight`; by default what its calls carry in one
round, calls_in_flight x max_batch_size). A variant past them borrows from one shared burst pool
(`server.burst_inflight`), of which it may hold at most `server.burst_share`, so a burst on one
variant always leaves the others their own places and part of the pool. A request holds its place from
routing to its answer; past both, it is answered 429 + Retry-After, naming the variant.

What the places bound is the count of requests (and so the bodies and decoded images they hold); how
long the admitted ones wait is the coalescer's job (service/coalesce.py sheds, 503, what the variant
cannot answer within its max_latency_ms at its measured speed). `server.max_inflight` stays in
service/http_limits.py as a backstop over all variants, set above the sum of these.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from . import metrics
from .config import ServingConfig
from .errors import ClientError, retry_later


class Admission:
    def __init__(self, caps: dict[str, int], burst: int, share: float, retry_after_s: int) -> None:
        self.caps = dict(caps)  # variant -> its own places
        self.burst = burst  # the shared pool
        self.most_borrowed = int(burst * share)  # of the pool, per variant
        self.retry_after_s = retry_after_s
        self.own = {v: 0 for v in caps}  # variant -> own places taken
        self.borrowed = {v: 0 for v in caps}  # variant -> pool places taken
        self.pool_used = 0

    @classmethod
    def from_config(cls, cfg: ServingConfig) -> Admission:
        return cls({n: v.resolved_max_inflight for n, v in cfg.variants.items()}, cfg.server.burst_inflight,
                   cfg.server.burst_share, cfg.server.retry_after_s)

    def held(self, variant: str) -> int:
        return self.own[variant] + self.borrowed[variant]

    def admit(self, variant: str) -> None:
        """Take a place for one request to `variant`, or raise 429 + Retry-After."""
        if self.own[variant] < self.caps[variant]:
            self.own[variant] += 1
        elif self.borrowed[variant] < self.most_borrowed and self.pool_used < self.burst:
            self.borrowed[variant] += 1
            self.pool_used += 1
        else:
            raise self.refusal(variant)
        metrics.VARIANT_INFLIGHT.labels(variant).set(self.held(variant))

    def release(self, variant: str) -> None:
        if self.borrowed[variant]:  # pool places first: they are the ones other variants may need
            self.borrowed[variant] -= 1
            self.pool_used -= 1
        else:
            self.own[variant] -= 1
        metrics.VARIANT_INFLIGHT.labels(variant).set(self.held(variant))

    @contextlib.contextmanager
    def hold(self, variant: str) -> Iterator[None]:
        """A place for the duration of the block (raises 429 when there is none)."""
        self.admit(variant)
        try:
            yield
        finally:
            self.release(variant)

    def refusal(self, variant: str) -> ClientError:
        if self.borrowed[variant] < self.most_borrowed:  # the pool is taken by others
            why = (f"its {self.caps[variant]} places are taken and the shared burst pool of {self.burst} is in use "
                   "by other variants")
        else:
            why = (f"{self.held(variant)} requests in flight: its {self.caps[variant]} places and the most it may "
                   f"borrow from the shared burst pool ({self.most_borrowed})")
        return retry_later(f"variant {variant!r} is overloaded: {why}; retry later", self.retry_after_s, 429)
