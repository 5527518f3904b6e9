"""Cascade thresholds from validation scores: pure functions, no model and no server.

Given each stage's calibrated probabilities on the same labelled images (cheapest stage first) and each
stage's cost (its MACs per image), a set of thresholds decides per image which stage answers: the first
whose top-1 probability reaches its threshold, else the last (service/cascade.py serves the same rule).
`simulate` gives the accuracy and mean cost of one set; `fit` searches the sets for a stated target:

- `drop`: accuracy within `drop` points (percentage points: 0.3 = 0.3%) of the last stage alone, at the
  least mean cost ("Wisdom of Committees", Wang et al., ICLR 2022, picks its thresholds so);
- `escalate`: at most that share of the images goes past the first stage, at the best accuracy.

The candidates for a stage's threshold are the quantiles of its own confidences (every distinct value
for a small set), plus 0 (never escalate) and a value above 1 (always escalate), so the last stage alone
is always a candidate and a `drop` target always has an answer.
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import numpy as np

ALWAYS = 1.01  # a threshold no calibrated probability reaches: the stage always escalates
MAX_SETS = 20_000  # threshold sets tried; the candidates per stage shrink so their product stays below it


@dataclass(frozen=True)
class CascadeFigures:
    thresholds: tuple[float, ...]
    accuracy: float  # top-1 of the cascade's answers, 0..1
    mean_cost: float  # mean over the images of the summed costs of the stages each ran
    answered: tuple[float, ...]  # share of the images each stage answered
    escalated: float  # share of the images that went past the first stage

    def as_dict(self) -> dict:
        d = asdict(self)
        return {k: [round(x, 6) for x in v] if isinstance(v, tuple) else round(v, 6) for k, v in d.items()}


@dataclass(frozen=True)
class Fit:
    chosen: CascadeFigures
    last: CascadeFigures  # the last stage alone, for comparison
    target: dict  # {"drop": points} or {"escalate": share}


def _check(probs: list[np.ndarray], labels: np.ndarray, costs: list[float]) -> None:
    if len(probs) < 2 or len(costs) != len(probs):
        raise ValueError(f"a cascade needs two or more stages with a cost each, got {len(probs)} score sets and "
                         f"{len(costs)} costs")
    shapes = {p.shape for p in probs}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2 or next(iter(shapes))[0] != len(labels) or not len(labels):
        raise ValueError(f"every stage's probabilities must be (images, classes) for the same {len(labels)} "
                         f"labelled images, got {sorted(shapes)}")


def stage_table(probs: list[np.ndarray], labels: np.ndarray, average_last: bool = False):
    """(confidence per stage, right-or-wrong per stage) as (stages, images) arrays; with `average_last`
    the last row is the mean of every stage's probabilities, what the last stage answers then."""
    labels = np.asarray(labels)
    conf = np.stack([p.max(axis=1) for p in probs])
    right = np.stack([p.argmax(axis=1) == labels for p in probs])
    if average_last:
        right[-1] = np.mean(probs, axis=0).argmax(axis=1) == labels
    return conf, right


def _figures(thresholds: tuple[float, ...], conf: np.ndarray, right: np.ndarray, costs: np.ndarray) -> CascadeFigures:
    n_stages, n = conf.shape
    stage = np.full(n, n_stages - 1)
    open_ = np.ones(n, bool)
    for i, t in enumerate(thresholds):
        stop = open_ & (conf[i] >= t)
        stage[stop] = i
        open_ &= ~stop
    accuracy = float(right[stage, np.arange(n)].mean())
    spent = np.cumsum(costs)[stage]
    answered = tuple(float((stage == i).mean()) for i in range(n_stages))
    return CascadeFigures(tuple(float(t) for t in thresholds), accuracy, float(spent.mean()), answered,
                          1.0 - answered[0])


def simulate(probs: list[np.ndarray], labels: np.ndarray, costs: list[float], thresholds: list[float],
             average_last: bool = False) -> CascadeFigures:
    """Accuracy and mean cost of the cascade with these thresholds on these images."""
    _check(probs, labels, costs)
    if len(thresholds) != len(probs) - 1:
        raise ValueError(f"{len(probs)} stages take {len(probs) - 1} threshold(s), got {len(thresholds)}")
    conf, right = stage_table(probs, labels, average_last)
    return _figures(tuple(thresholds), conf, right, np.asarray(costs, float))


def alone(probs: list[np.ndarray], labels: np.ndarray, costs: list[float]) -> CascadeFigures:
    """The last stage serving alone: what a `drop` target is measured against."""
    accuracy = float((probs[-1].argmax(axis=1) == np.asarray(labels)).mean())
    return CascadeFigures((), accuracy, float(costs[-1]), (0.0,) * (len(probs) - 1) + (1.0,), 1.0)


def candidates(conf: np.ndarray, count: int) -> list[float]:
    """Thresholds worth trying for one stage: its distinct confidences (or `count` quantiles of them),
    0 and ALWAYS."""
    values = np.unique(conf)
    if len(values) > count:
        values = np.unique(np.quantile(conf, np.linspace(0, 1, count)))
    return sorted({0.0, ALWAYS, *map(float, values)})


def curve(probs: list[np.ndarray], labels: np.ndarray, costs: list[float], average_last: bool = False,
          points: int = 50) -> list[CascadeFigures]:
    """The two-stage cascade over its first threshold (accuracy against mean cost), for a trade-off plot."""
    _check(probs, labels, costs)
    if len(probs) != 2:
        raise ValueError("the curve is drawn for a two-stage cascade")
    conf, right = stage_table(probs, labels, average_last)
    return [_figures((t,), conf, right, np.asarray(costs, float)) for t in candidates(conf[0], points)]


def fit(probs: list[np.ndarray], labels: np.ndarray, costs: list[float], *, drop: float | None = None,
        escalate: float | None = None, average_last: bool = False) -> Fit:
    """The thresholds for one target: `drop` points of accuracy below the last stage's at the least mean
    cost, or at most `escalate` of the images past the first stage at the best accuracy. Ties go to the
    other figure (accuracy for `drop`, cost for `escalate`), then to the lower thresholds."""
    _check(probs, labels, costs)
    if (drop is None) == (escalate is None):
        raise ValueError("give one target: drop (points of accuracy) or escalate (a share of the images)")
    if drop is not None and not drop >= 0:
        raise ValueError(f"drop is in points of accuracy, >= 0, got {drop}")
    if escalate is not None and not 0 <= escalate <= 1:
        raise ValueError(f"escalate is a share of the images, 0..1, got {escalate}")
    conf, right = stage_table(probs, labels, average_last)
    cost = np.asarray(costs, float)
    per_stage = max(2, int(MAX_SETS ** (1 / (len(probs) - 1))) - 2)
    grids = [candidates(conf[i], per_stage) for i in range(len(probs) - 1)]
    last = alone(probs, labels, costs)
    best, best_key = None, None
    for ts in itertools.product(*grids):
        f = _figures(ts, conf, right, cost)
        if drop is not None:
            if f.accuracy < last.accuracy - drop / 100 - 1e-12:
                continue
            key = (f.mean_cost, -f.accuracy, ts)
        else:
            if f.escalated > escalate + 1e-12:
                continue
            key = (-f.accuracy, f.mean_cost, ts)
        if best_key is None or key < best_key:
            best, best_key = f, key
    target = {"drop": drop} if drop is not None else {"escalate": escalate}
    return Fit(best, last, target)
