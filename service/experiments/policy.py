"""A route's policy: `bandit` moves its split toward the variants that feedback shows are right.

    routes:
      fashion:
        split: {b0: 0.5, mec: 0.25, compact: 0.25}
        control: b0                     # the experiment that records answers and takes feedback
        policy: {bandit: {floor: 0.05, every_s: 30, cost_per_ms: 0}}   # or just: policy: bandit

Every `every_s` the gateway reads each variant's labelled answers in the route and sets the split to
Thompson sampling's shares (service/experiments/bandit.py): each variant keeps at least `floor`, and
`cost_per_ms` weighs median latency against accuracy. The change goes through the same path as
`PATCH /routes` (saved, shown in GET /routes) and is written to the audit log as made by the policy.
Clients stay sticky: the router hashes them into the new weights, so few move at each change.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .bandit import FLOOR, Posterior, shares

POLICIES = ("bandit",)
MIN_CHANGE = 0.01  # a recomputed split that moves no weight by this much is not applied (no audit noise)


@dataclass(frozen=True)
class BanditPolicy:
    floor: float = FLOOR
    every_s: float = 30.0
    cost_per_ms: float = 0.0

    def as_dict(self) -> dict:
        return {"bandit": {"floor": self.floor, "every_s": self.every_s, "cost_per_ms": self.cost_per_ms}}


def parse_policy(where: str, raw: Any, split: dict[str, float], control: str | None) -> BanditPolicy:
    """`routes.NAME.policy` -> BanditPolicy; raises ValueError naming the key (config.py makes it a
    ConfigError)."""
    if raw == "bandit":
        raw = {"bandit": {}}
    if not isinstance(raw, dict) or set(raw) != {"bandit"}:
        raise ValueError(f"{where}.policy: expected `bandit` or {{bandit: {{floor, every_s, cost_per_ms}}}}, got "
                         f"{raw!r}")
    opts = raw["bandit"] or {}
    if not isinstance(opts, dict) or set(opts) - {"floor", "every_s", "cost_per_ms"}:
        raise ValueError(f"{where}.policy.bandit: the keys are floor, every_s and cost_per_ms")
    for key, value in opts.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{where}.policy.bandit.{key}: expected a number >= 0, got {value!r}")
    if control is None:
        raise ValueError(f"{where}.policy: a bandit learns from feedback, so the route needs an experiment: "
                         "name its `control`")
    policy = BanditPolicy(**{k: float(v) for k, v in opts.items()})
    if policy.floor * len(split) > 1:
        raise ValueError(f"{where}.policy.bandit.floor: {policy.floor} for each of {len(split)} variants is more "
                         "than the whole traffic")
    if policy.every_s < 1:
        raise ValueError(f"{where}.policy.bandit.every_s: at least 1 s, got {policy.every_s}")
    return policy


def next_split(policy: BanditPolicy, split: dict[str, float], rows: list, rng: Any = None) -> dict[str, float]:
    """The split's variants weighted by Thompson sampling on their served answers' feedback (`rows`:
    records.VariantSummary of the route; shadow rows do not count: nobody was given those answers). A
    variant without feedback yet counts as unknown (a uniform prior), and its latency as the slowest seen."""
    served = {r.variant: r for r in rows if not r.shadow and r.variant in split}
    slowest = max((r.p50_ms for r in served.values() if r.p50_ms), default=0.0)
    posteriors = {v: Posterior.from_counts((served[v].labelled, served[v].correct) if v in served else (0, 0),
                                           (served[v].p50_ms if v in served and served[v].p50_ms else slowest))
                  for v in split}
    return shares(posteriors, policy.floor, rng, cost_per_ms=policy.cost_per_ms)


def moved(old: dict[str, float], new: dict[str, float]) -> bool:
    return any(abs(old.get(v, 0.0) - w) >= MIN_CHANGE for v, w in new.items())
