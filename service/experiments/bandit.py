"""The bandit split: Thompson sampling over each variant's feedback accuracy, as traffic weights.

Each variant's accuracy has a Beta posterior, Beta(1 + correct, 1 + wrong) from a uniform prior. Its
score is its accuracy less a latency cost, when one is configured:

    score = accuracy - cost_per_ms * p50_ms

so cost_per_ms = 0.001 trades one point of accuracy for 10 ms of median latency. The split gives each
variant the probability that its score is the highest (Thompson sampling, batched: "probability
matching"), estimated from `draws` joint samples of the posteriors, and keeps `floor` of the traffic
for every variant so that none stops collecting feedback:

    share = floor + (1 - k * floor) * P(variant scores highest)       (k variants)

The split is recomputed periodically (on new feedback, or every so many seconds) and handed to the
router, which hashes clients into it: stickiness is the router's job, not this module's. Given the same
posteriors and the same seed, the split is the same.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .stats import Counts, as_counts

# Joint samples per recomputation: the share's Monte Carlo error is at most 0.5 / sqrt(draws), under a
# point at 4,000, which moves few sticky clients between recomputations.
DRAWS = 4000
# Each variant keeps 5% of the traffic: a variant that fell behind on a few hundred labels can still
# recover, and the cost is at most 5% of the traffic at the gap to the best.
FLOOR = 0.05


@dataclass(frozen=True)
class Posterior:
    """Beta(alpha, beta) over one variant's accuracy; `p50_ms` is its median latency, if measured."""
    alpha: float
    beta: float
    p50_ms: float | None = None

    def __post_init__(self) -> None:
        if not (self.alpha > 0 and self.beta > 0):
            raise ValueError(f"a Beta posterior needs alpha > 0 and beta > 0, got {self.alpha}, {self.beta}")
        if self.p50_ms is not None and not self.p50_ms >= 0:
            raise ValueError(f"p50_ms must be >= 0, got {self.p50_ms}")

    @classmethod
    def from_counts(cls, counts: Counts | tuple[int, int], p50_ms: float | None = None) -> Posterior:
        """The posterior after `counts` (labelled, correct) from a uniform Beta(1, 1) prior."""
        counts = as_counts(counts)
        return cls(1.0 + counts.correct, 1.0 + counts.labelled - counts.correct, p50_ms)

    @property
    def mean(self) -> float:
        return self.alpha / (self.alpha + self.beta)


def shares(posteriors: Mapping[str, Posterior], floor: float = FLOOR,
           rng: np.random.Generator | int | None = None, draws: int = DRAWS,
           cost_per_ms: float = 0.0) -> dict[str, float]:
    """The traffic split, variant -> weight (weights sum to 1, each at least `floor`); module doc.

    `rng` is a numpy Generator or a seed (the same seed and posteriors give the same split). With
    `cost_per_ms` > 0 every variant needs its `p50_ms`."""
    if not posteriors:
        raise ValueError("shares of no variants")
    names = list(posteriors)
    k = len(names)
    if not 0 <= floor <= 1 / k:
        raise ValueError(f"a floor of {floor} for each of {k} variants is not in [0, {1 / k:.4g}]")
    if draws < 1 or cost_per_ms < 0:
        raise ValueError(f"need draws >= 1 and cost_per_ms >= 0, got {draws}, {cost_per_ms}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    a = np.array([posteriors[n].alpha for n in names], dtype=float)
    b = np.array([posteriors[n].beta for n in names], dtype=float)
    score = rng.beta(a, b, size=(draws, k))
    if cost_per_ms > 0:
        missing = [n for n in names if posteriors[n].p50_ms is None]
        if missing:
            raise ValueError(f"a latency cost needs every variant's p50_ms; missing for {missing}")
        score = score - cost_per_ms * np.array([posteriors[n].p50_ms for n in names], dtype=float)
    best = np.bincount(score.argmax(axis=1), minlength=k) / draws
    split = floor + (1 - k * floor) * best
    return {n: float(s) for n, s in zip(names, split)}
