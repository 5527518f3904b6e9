"""The statistics of an A/B test on feedback accuracy: pure functions, no I/O, numpy-vectorised.

A variant's evidence is its `Counts`: labelled answers and how many of them were correct.

- `wilson()`: the interval of one variant's accuracy.
- `sequential()`: the difference of two accuracies (variant - control) with an always-valid p-value and
  confidence sequence (mSPRT). Arrays in, arrays out, so a simulation of thousands of experiments is
  one call.
- `minimum_detectable_effect()`, `predicted_sample_size()`: what a look at a given size can see, and
  where the test is expected to decide for a given true difference.
- `statuses()` / `decide()`: the status of an experiment (collecting / better / worse / no_difference).

The sequential rule: the mixture sequential probability ratio test (mSPRT) of Johari, Koomen, Pekelis
and Walsh, "Always valid inference" (the rule of Optimizely's stats engine). With n_c and n_v labelled
answers and accuracies p_c, p_v, let

    d = p_v - p_c
    V = q_c (1 - q_c) / n_c + q_v (1 - q_v) / n_v,   q = (correct + 1) / (labelled + 2)

(q only in V: an arm at 0/n or n/n would otherwise have no variance and end the test on its first look).
In the normal approximation d ~ N(theta, V). The likelihood ratio of theta against theta0, mixed over
theta ~ N(theta0, tau^2), is

    L(theta0) = sqrt(V / (V + tau^2)) * exp(tau^2 (d - theta0)^2 / (2 V (V + tau^2)))

When theta = theta0, L is a martingale of mean 1 in the information 1/V, so (Ville's inequality) the
chance that it ever reaches 1/alpha, at any of any number of looks, is at most alpha. Hence:

    p-value              = min(1, 1 / L(0))
    confidence sequence  = {theta0 : L(theta0) < 1/alpha}
                         = d +- sqrt(V (V + tau^2) / tau^2 * (2 ln(1/alpha) + ln((V + tau^2) / V)))

Acting the first time the p-value is at most alpha keeps the false-positive rate at most alpha however
often one looks, and the sequence covers the true difference at every look at once with probability at
least 1 - alpha. The running minimum of the p-value and the running intersection of the intervals over
looks are valid too (`decide(..., earlier=...)`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

# NOTE: tau is the spread of differences the test is tuned for (it is most powerful near |theta| ~ tau,
# and valid for every difference). Variants of one model family differ by 1-3 points of accuracy (the
# fashion variants: 87.7-90.2%), so 2 points; the decision for 0.90 vs 0.85 then comes near 957 labelled
# answers per arm (against 802 with tau = 0.05), and a 2-point gap is reached sooner than with a wider tau.
TAU = 0.02
ALPHA = 0.05
# Below this many labelled answers per arm the normal approximation of a proportion near 0.9 is poor
# (n p (1 - p) about 10), so nothing is concluded.
MIN_LABELLED = 100
# "No difference" means: with confidence 1 - alpha, the difference is within one point of accuracy.
# Two equal variants near 88% get there after about 21,000 labelled answers per arm (2 points: 4,900;
# 3 points: 2,300); a route that can only afford fewer sets a wider margin.
MARGIN = 0.01
POWER = 0.8

COLLECTING, BETTER, WORSE, NO_DIFFERENCE = "collecting", "better", "worse", "no_difference"


@dataclass(frozen=True)
class Counts:
    """One variant's feedback: `labelled` answers, `correct` of them right."""
    labelled: int
    correct: int

    def __post_init__(self) -> None:
        if not 0 <= self.correct <= self.labelled:
            raise ValueError(f"counts need 0 <= correct <= labelled, got correct={self.correct}, "
                             f"labelled={self.labelled}")

    @property
    def accuracy(self) -> float:
        """The observed accuracy; nan with nothing labelled."""
        return self.correct / self.labelled if self.labelled else math.nan


def as_counts(value: Counts | tuple[int, int]) -> Counts:
    return value if isinstance(value, Counts) else Counts(*value)


def _z(confidence: float) -> float:
    """The two-sided normal quantile of `confidence` (1.96 for 0.95)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a proportion `successes / n`; (0, 1) when n is 0.

    Unlike the normal (Wald) interval it stays inside [0, 1] and keeps its coverage near 0 and 1, where
    good classifiers' accuracies are."""
    Counts(n, successes)  # checks 0 <= successes <= n
    if n == 0:
        return 0.0, 1.0
    z = _z(confidence)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # at 0/n and n/n the formula gives the bound exactly; rounding must not move it past 0 or 1
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Sequential:
    """The mSPRT at one look (fields are floats, or arrays of the inputs' shape)."""
    difference: np.ndarray | float  # variant - control accuracy
    low: np.ndarray | float  # the confidence sequence at level 1 - alpha
    high: np.ndarray | float
    p_value: np.ndarray | float  # always valid


def _variance(labelled: np.ndarray, correct: np.ndarray) -> np.ndarray:
    q = (correct + 1.0) / (labelled + 2.0)
    return q * (1 - q) / labelled


def _half_width(v: np.ndarray, alpha: float, tau: float) -> np.ndarray:
    t2 = tau * tau
    return np.sqrt(v * (v + t2) / t2 * (2 * math.log(1 / alpha) + np.log((v + t2) / v)))


def sequential(control_labelled, control_correct, variant_labelled, variant_correct,
               alpha: float = ALPHA, tau: float = TAU) -> Sequential:
    """The difference variant - control, its confidence sequence and always-valid p-value (module doc).

    Takes numbers or arrays (broadcast together). An arm with nothing labelled gives difference nan,
    interval (-1, 1) and p-value 1."""
    if not 0 < alpha < 1 or tau <= 0:
        raise ValueError(f"need 0 < alpha < 1 and tau > 0, got alpha={alpha}, tau={tau}")
    n_c, s_c, n_v, s_v = np.broadcast_arrays(*(np.asarray(x, dtype=float) for x in
                                               (control_labelled, control_correct, variant_labelled, variant_correct)))
    empty = (n_c <= 0) | (n_v <= 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(empty, np.nan, s_v / n_v - s_c / n_c)
        v = np.where(empty, 1.0, _variance(n_c, s_c) + _variance(n_v, s_v))
    t2 = tau * tau
    log_l = 0.5 * np.log(v / (v + t2)) + t2 * np.nan_to_num(d) ** 2 / (2 * v * (v + t2))
    p = np.where(empty, 1.0, np.minimum(1.0, np.exp(-log_l)))
    half = _half_width(v, alpha, tau)
    low = np.where(empty, -1.0, np.maximum(-1.0, d - half))
    high = np.where(empty, 1.0, np.minimum(1.0, d + half))
    if d.ndim == 0:
        return Sequential(float(d), float(low), float(high), float(p))
    return Sequential(d, low, high, p)


def statuses(low, high, control_labelled, variant_labelled, margin: float = MARGIN,
             min_labelled: int = MIN_LABELLED) -> np.ndarray:
    """The status for confidence-sequence bounds (arrays broadcast together; a 0-d array for numbers):

    - collecting: an arm has fewer than `min_labelled` labelled answers, or none of the rest holds;
    - better: low > 0 (the same as p-value <= alpha with a positive difference);
    - worse: high < 0;
    - no_difference: -margin < low and high < margin: with confidence 1 - alpha the two accuracies are
      within `margin` of each other. It comes about when the MDE falls to the margin, if they are equal.
    """
    low, high, n_c, n_v = np.broadcast_arrays(*(np.asarray(x, dtype=float) for x in
                                                (low, high, control_labelled, variant_labelled)))
    out = np.full(low.shape, COLLECTING, dtype=object)
    out[(low > -margin) & (high < margin)] = NO_DIFFERENCE
    out[high < 0] = WORSE
    out[low > 0] = BETTER
    out[(n_c < min_labelled) | (n_v < min_labelled)] = COLLECTING
    return out


def minimum_detectable_effect(n_a, n_b, p_control: float, alpha: float = ALPHA, power: float = POWER,
                              tau: float = TAU):
    """The smallest difference |theta| that a look at n_a (control) and n_b (variant) labelled answers
    declares with probability at least `power`, whichever its sign: the smallest m with

        m >= half_width(V) + z_power * sqrt(V),   V = p (1 - p) / n_a + q (1 - q) / n_b

    where p is the control's accuracy and q = p + m or p - m, whichever is nearer 1/2 (the side with
    more variance, so the harder one). Inf when an arm has nothing labelled. Arrays broadcast."""
    if not 0 < power < 1 or not 0 <= p_control <= 1:
        raise ValueError(f"need 0 < power < 1 and 0 <= p_control <= 1, got {power}, {p_control}")
    n_a, n_b = np.broadcast_arrays(np.asarray(n_a, dtype=float), np.asarray(n_b, dtype=float))
    some = (n_a > 0) & (n_b > 0)
    n_a, n_b = np.where(some, n_a, 1.0), np.where(some, n_b, 1.0)
    z = NormalDist().inv_cdf(power)
    floor_pq = 1e-6  # an accuracy of exactly 0 or 1 still has some doubt

    def needed(m: np.ndarray) -> np.ndarray:
        q = np.clip(np.where(p_control >= 0.5, p_control - m, p_control + m), 0.0, 1.0)
        v = max(p_control * (1 - p_control), floor_pq) / n_a + np.maximum(q * (1 - q), floor_pq) / n_b
        return _half_width(v, alpha, tau) + z * np.sqrt(v)

    # needed(m) changes more slowly than m, so m - needed(m) crosses 0 once: bisect on [0, 2]
    lo, hi = np.zeros(n_a.shape), np.full(n_a.shape, 2.0)
    for _ in range(50):
        mid = (lo + hi) / 2
        enough = mid >= needed(mid)
        lo, hi = np.where(enough, lo, mid), np.where(enough, mid, hi)
    mde = np.where(some, hi, np.inf)
    return float(mde) if mde.ndim == 0 else mde


def predicted_sample_size(p_control: float, p_variant: float, alpha: float = ALPHA, tau: float = TAU) -> int:
    """Labelled answers per arm (equal split) at which a look whose estimate equals the true difference
    crosses the boundary: the smallest n with L(0) >= 1/alpha at d = p_variant - p_control and
    V = (p_c (1 - p_c) + p_v (1 - p_v)) / n. Actual runs decide around it (a noisy path crosses sooner
    or later); it is the size an experiment with that difference should be planned for."""
    d, t2 = p_variant - p_control, tau * tau
    if d == 0:
        raise ValueError("equal accuracies are never declared different")
    pq = p_control * (1 - p_control) + p_variant * (1 - p_variant)

    def crosses(n: int) -> bool:
        v = pq / n
        return 0.5 * math.log(v / (v + t2)) + t2 * d * d / (2 * v * (v + t2)) >= math.log(1 / alpha)

    lo, hi = 1, 1
    while not crosses(hi):  # the log ratio grows with n once d is fixed, so bisect
        lo, hi = hi, hi * 2
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if crosses(mid) else (mid + 1, hi)
    return lo


@dataclass(frozen=True)
class Decision:
    """Where a variant stands against the control (`decide`)."""
    status: str  # collecting / better / worse / no_difference (statuses())
    difference: float  # variant - control accuracy; nan with nothing labelled
    low: float  # the always-valid interval of the difference, level 1 - alpha
    high: float
    p_value: float  # always valid: the running minimum when `earlier` looks were passed
    mde: float  # minimum_detectable_effect at the current sample sizes
    alpha: float
    control: Counts
    variant: Counts

    def as_dict(self) -> dict:
        """JSON-ready: nan and inf become None."""
        def num(x: float) -> float | None:
            return x if math.isfinite(x) else None
        return {"status": self.status, "difference": num(self.difference), "low": num(self.low),
                "high": num(self.high), "p_value": num(self.p_value), "mde": num(self.mde),
                "confidence": 1 - self.alpha,
                "control": {"labelled": self.control.labelled, "correct": self.control.correct},
                "variant": {"labelled": self.variant.labelled, "correct": self.variant.correct}}


def decide(control: Counts | tuple[int, int], variant: Counts | tuple[int, int], alpha: float = ALPHA, *,
           tau: float = TAU, margin: float = MARGIN, min_labelled: int = MIN_LABELLED, power: float = POWER,
           earlier: Decision | None = None) -> Decision:
    """The decision on `variant` against `control` at this look (module doc for the rule, statuses()
    for the status). `earlier`, the Decision of the previous look of the same experiment (same alpha
    and tau), carries the running minimum p-value and the running intersection of the intervals, so a
    status once reached stays reached."""
    control, variant = as_counts(control), as_counts(variant)
    now = sequential(control.labelled, control.correct, variant.labelled, variant.correct, alpha, tau)
    low, high, p = now.low, now.high, now.p_value
    if earlier is not None and min(earlier.control.labelled, earlier.variant.labelled) >= min_labelled:
        # looks before min_labelled concluded nothing, so they do not narrow the interval either
        low, high, p = max(low, earlier.low), min(high, earlier.high), min(p, earlier.p_value)
    status = str(statuses(low, high, control.labelled, variant.labelled, margin, min_labelled)[()])
    p_ctl = control.accuracy if control.labelled else 0.5
    mde = minimum_detectable_effect(control.labelled, variant.labelled, p_ctl, alpha, power, tau)
    return Decision(status, now.difference, low, high, p, mde, alpha, control, variant)
