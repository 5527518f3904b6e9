"""A route's policy: `bandit` moves its split toward the variants that feedback shows are right;
`promote` moves it to a variant once the experiment's sequential decision says it beats the control.

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

    policy: {promote: {share: 1.0, every_s: 30}}    # or just: policy: promote

`promote` leaves the split alone until a variant's decision against the control (service/experiments/
stats.py: always valid, so looking every `every_s` does not inflate false promotions) is `better`; then
that variant gets `share` of the traffic and the others split the rest. With several better, the one
with the largest difference wins.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .bandit import FLOOR, Posterior, shares

POLICIES = ("bandit", "promote", "budget", "cascade")  # budget: service/budget.py; cascade: service/cascade.py
MIN_CHANGE = 0.01  # a recomputed split that moves no weight by this much is not applied (no audit noise)


@dataclass(frozen=True)
class BanditPolicy:
    floor: float = FLOOR
    every_s: float = 30.0
    cost_per_ms: float = 0.0

    name = "bandit"
    uses_feedback = True  # feedback moves the split: it is an admin's act (server.feedback_auth)

    def as_dict(self) -> dict:
        return {"bandit": {"floor": self.floor, "every_s": self.every_s, "cost_per_ms": self.cost_per_ms}}

    def next_split(self, split: dict[str, float], rows: list, control: str, rng: Any = None) -> dict[str, float]:
        return next_split(self, split, rows, rng)


@dataclass(frozen=True)
class PromotePolicy:
    share: float = 1.0
    every_s: float = 30.0

    name = "promote"
    uses_feedback = True

    def as_dict(self) -> dict:
        return {"promote": {"share": self.share, "every_s": self.every_s}}

    def next_split(self, split: dict[str, float], rows: list, control: str, rng: Any = None) -> dict[str, float]:
        """The split with the winner at `share`, or `split` itself while no variant beats the control."""
        from .stats import BETTER, Counts, decide

        served = {r.variant: Counts(r.labelled, r.correct) for r in rows if not r.shadow and r.variant in split}
        ctrl = served.get(control, Counts(0, 0))
        better = [(d.difference, v) for v, c in served.items() if v != control
                  for d in [decide(ctrl, c)] if d.status == BETTER]
        if not better:
            return dict(split)
        winner = max(better)[1]
        rest = (1 - self.share) / (len(split) - 1)
        return {v: self.share if v == winner else rest for v in split}


KEYS = {"bandit": ("floor", "every_s", "cost_per_ms"), "promote": ("share", "every_s")}


def parse_policy(where: str, raw: Any, split: dict[str, float], control: str | None) -> Any:
    """`routes.NAME.policy` -> its policy; raises ValueError naming the key (config.py makes it a
    ConfigError)."""
    if raw == "budget" or (isinstance(raw, dict) and list(raw) == ["budget"]):  # chooses per request
        from ..budget import parse_budget_policy

        return parse_budget_policy(where, raw, control)
    if isinstance(raw, dict) and len(raw) == 1 and "cascade" in raw:  # not a split mover: service/cascade.py
        from ..cascade import parse_cascade

        return parse_cascade(where, raw["cascade"], split)
    if isinstance(raw, str) and raw in KEYS:
        raw = {raw: {}}
    if not isinstance(raw, dict) or len(raw) != 1 or next(iter(raw)) not in KEYS:
        raise ValueError(f"{where}.policy: expected `bandit`, `promote`, `budget`, {{bandit: {{floor, every_s, "
                         f"cost_per_ms}}}}, {{promote: {{share, every_s}}}}, {{budget: {{default_ms, max_ms, ...}}}} or "
                         f"{{cascade: {{stages, thresholds}}}}, got {raw!r:.200}")
    name = next(iter(raw))
    opts = raw[name] or {}
    if not isinstance(opts, dict) or set(opts) - set(KEYS[name]):
        raise ValueError(f"{where}.policy.{name}: the keys are {', '.join(KEYS[name])}")
    for key, value in opts.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{where}.policy.{name}.{key}: expected a number >= 0, got {value!r}")
    if control is None:
        raise ValueError(f"{where}.policy: a {name} policy learns from feedback, so the route needs an experiment: "
                         "name its `control`")
    policy = (BanditPolicy if name == "bandit" else PromotePolicy)(**{k: float(v) for k, v in opts.items()})
    if isinstance(policy, BanditPolicy) and policy.floor * len(split) > 1:
        raise ValueError(f"{where}.policy.bandit.floor: {policy.floor} for each of {len(split)} variants is more "
                         "than the whole traffic")
    if isinstance(policy, PromotePolicy) and not (0 < policy.share <= 1 and len(split) > 1):
        raise ValueError(f"{where}.policy.promote: share is in (0, 1], and the split needs a variant to promote "
                         f"besides the control (share {policy.share}, split {', '.join(split)})")
    if policy.every_s < 1:
        raise ValueError(f"{where}.policy.{name}.every_s: at least 1 s, got {policy.every_s}")
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
