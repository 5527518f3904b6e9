"""`policy: budget`: per request, the most accurate variant whose predicted latency fits the client's budget.

    routes:
      fashion:
        split: {b0: 1, compact: 1}         # the variants the policy chooses among (weights ignored, 0 = out)
        policy: {budget: {default_ms: 250, max_ms: 10000, accuracy: val}}   # or just: policy: budget

The budget is the request's `X-Latency-Budget-Ms` header, else the route's `default_ms`; above `max_ms` it is
refused (400). Among the split's variants that are up, the most accurate whose predicted latency fits answers;
when none fits, the fastest does and the answer says `budget_missed: true`. An explicit `variant` wins, as it
wins over a split. The prediction for a variant (INFaaS's, from what the gateway already measures):

    predicted = images ahead x seconds per image / calls in flight + service time

- images ahead: the requests admitted to the variant (service/admission.py) or the images its coalescer holds,
  queued and in flight, whichever is more (a request still decoding is admitted but not yet in the queue);
- seconds per image: the coalescer's decayed average of its calls' wall time per image (service/coalesce.py);
- service time: the median of the variant's recent `/classify` answers' gateway time less their queue wait.
  Figures older than `SAMPLE_MAX_AGE_S` are forgotten, so a variant that was too slow to be chosen is tried
  again once its old figures go: its latency may have changed while nobody asked it.
A variant not measured yet counts as fitting: answering a request is the only way to measure it.

Accuracy: the manifest's validation top-1 (`val_top1`) where the trainer recorded one, else its test top-1;
with `accuracy: online`, the route's experiment's accuracy on labelled answers (POST /feedback) for each
variant whose 95% interval is at most `online_width` wide, read every `ONLINE_EVERY_S` off the request path.

A route without `policy: budget` ignores a well-formed header (a client may send its budget to every route;
whether a route honours it is its operator's choice, and its answers then carry no `budget_ms`), but a
malformed one is refused everywhere: it is a client's bug wherever it is sent.
"""
from __future__ import annotations

import asyncio
import logging
import math
import re
import statistics
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Callable

from . import metrics
from .errors import ClientError
from .routing import Assignment, shown

logger = logging.getLogger("effnet.gateway")

HEADER = "X-Latency-Budget-Ms"
ACCURACY_SOURCES = ("val", "online")
SAMPLES = 32  # service-time samples kept per variant: a median over recent answers, not over the day
SAMPLE_MAX_AGE_S = 60.0
ONLINE_EVERY_S = 5.0  # a summary reads up to 10,000 records per variant: not per request
# Plain decimal milliseconds: float() would also take "1_000", "1e3", "nan" and "inf", which no client means.
_MS = re.compile(r"[0-9]{1,9}(\.[0-9]{1,6})?", flags=re.ASCII)

FITS = "most accurate that fits"
UNMEASURED = "most accurate that fits (not measured yet)"
NONE_FITS = "none fits: fastest"


@dataclass(frozen=True)
class BudgetPolicy:
    default_ms: float = 250.0  # a budget for requests without the header: an interactive answer
    max_ms: float = 10_000.0  # beyond it a budget is a mistake (a timeout, not a budget): 400
    accuracy: str = "val"  # val: the manifests' figures; online: the experiment's where it knows enough
    online_width: float = 0.05  # an online figure counts once its 95% interval is at most this wide

    name = "budget"
    every_s = math.inf  # the gateway's split loop never runs it: the choice is per request

    @property
    def uses_feedback(self) -> bool:  # online accuracy steers the choice: feedback then moves traffic
        return self.accuracy == "online"

    def as_dict(self) -> dict:
        return {"budget": {"default_ms": self.default_ms, "max_ms": self.max_ms, "accuracy": self.accuracy,
                           "online_width": self.online_width}}

    def next_split(self, split: dict[str, float], rows: list, control: str, rng: Any = None) -> dict[str, float]:
        return dict(split)  # the split only names the candidates


def parse_budget_policy(where: str, raw: Any, control: str | None) -> BudgetPolicy:
    """`budget` or {budget: {...}} -> BudgetPolicy; raises ValueError naming the key."""
    opts = {} if raw == "budget" else raw["budget"] or {}
    keys = ("default_ms", "max_ms", "accuracy", "online_width")
    if not isinstance(opts, dict) or set(opts) - set(keys):
        raise ValueError(f"{where}.policy.budget: the keys are {', '.join(keys)}")
    for key in ("default_ms", "max_ms", "online_width"):
        value = opts.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError(f"{where}.policy.budget.{key}: expected a number > 0, got {value!r}")
    if opts.get("accuracy", "val") not in ACCURACY_SOURCES:
        raise ValueError(f"{where}.policy.budget.accuracy: expected val or online, got {opts['accuracy']!r}")
    policy = BudgetPolicy(**{k: v if k == "accuracy" else float(v) for k, v in opts.items()})
    if policy.default_ms > policy.max_ms:
        raise ValueError(f"{where}.policy.budget: default_ms ({policy.default_ms:g}) is above max_ms "
                         f"({policy.max_ms:g})")
    if policy.accuracy == "online" and control is None:
        raise ValueError(f"{where}.policy.budget.accuracy: online accuracy comes from the route's experiment: "
                         "name its `control`, or use accuracy: val")
    return policy


def parse_header(values: list[str]) -> float | None:
    """The budget in ms from the header's values (None: not sent); raises ClientError (400) naming it."""
    if not values:
        return None
    if len(values) > 1:
        raise ClientError(f"{HEADER} is given {len(values)} times; give it once")
    value = values[0].strip()
    if not _MS.fullmatch(value) or float(value) <= 0:
        raise ClientError(f"{HEADER} must be a positive number of milliseconds such as 250, got {shown(value)}")
    return float(value)


def images_in(form: Any) -> int:
    """The images a classify form carries (a batch's prediction counts them all; at least one)."""
    return max(1, len(form.getlist("images")) + len(form.getlist("image")))


# the choice: pure, from given figures ----------------------------------------------------------------


@dataclass(frozen=True)
class Figures:
    """What is known of one candidate variant now."""
    variant: str
    accuracy: float | None  # None: unknown, ranked below every known figure
    ahead: int = 0  # images admitted or queued before this request
    seconds_per_image: float | None = None  # the coalescer's recent wall time per image of its calls
    parallel: int = 1  # calls in flight at once: the queue drains this many calls at a time
    service_s: float | None = None  # recent median of one image's time, queue wait excluded; None: not measured

    def predicted_s(self, images: int = 1) -> float | None:
        """Seconds until this request's `images` would be answered; None while the variant is not measured."""
        if self.service_s is None:
            return None
        queue = (self.ahead + images - 1) * (self.seconds_per_image or self.service_s) / max(1, self.parallel)
        return queue + self.service_s


@dataclass(frozen=True)
class Choice:
    variant: str
    budget_ms: float
    predicted_ms: float | None
    reason: str  # FITS, UNMEASURED or NONE_FITS

    @property
    def missed(self) -> bool:
        return self.reason == NONE_FITS


@dataclass(frozen=True)
class Cut:
    """A cascade ended early by a latency budget: it runs its first `last` stages only."""
    budget_ms: float
    last: int
    predicted_ms: float  # of the stages up to the first one that does not fit

    def fields(self, stages: tuple[str, ...]) -> dict:
        return {"budget_ms": self.budget_ms, "cascade_cut_after": stages[self.last - 1],
                "cascade_predicted_ms": self.predicted_ms}


def choose(candidates: list[Figures], budget_ms: float, images: int = 1) -> Choice:
    """The most accurate candidate whose prediction fits `budget_ms` (ties: the faster, then the first
    given); else the fastest. `candidates` must not be empty."""
    if not candidates:
        raise ValueError("no candidate variant")
    predicted = {f.variant: f.predicted_s(images) for f in candidates}

    def ms(f: Figures) -> float | None:
        return None if predicted[f.variant] is None else predicted[f.variant] * 1000

    fits = [f for f in candidates if ms(f) is None or ms(f) <= budget_ms]
    if fits:
        best = max(fits, key=lambda f: (f.accuracy if f.accuracy is not None else -math.inf,
                                        -(ms(f) if ms(f) is not None else 0.0)))
        return Choice(best.variant, budget_ms, ms(best), FITS if ms(best) is not None else UNMEASURED)
    fastest = min(candidates, key=lambda f: (ms(f), -(f.accuracy if f.accuracy is not None else -math.inf)))
    return Choice(fastest.variant, budget_ms, ms(fastest), NONE_FITS)


def offline_accuracy(manifest_metrics: dict) -> float | None:
    """The manifest's validation top-1 where the trainer held out a validation split, else its test top-1."""
    for key in ("val_top1", "top1"):
        value = manifest_metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def online_accuracy(labelled: int, correct: int, width: float) -> float | None:
    """The accuracy on labelled answers once its 95% Wilson interval is at most `width` wide, else None."""
    from .experiments.stats import wilson

    if labelled <= 0:
        return None
    low, high = wilson(correct, labelled)
    return correct / labelled if high - low <= width else None


# the gateway's side ------------------------------------------------------------------------------------


class Budget:
    """The figures of every variant, kept as the gateway answers, and the choice for each request.

    `held(variant)`: requests admitted to it (service/admission.py); `coalescer(variant)`: its coalescer or
    None before its first call; `parallel(variant)`: its calls in flight; `summary(route)`: the experiment's
    records.VariantSummary rows (a blocking database read) or None without experiments."""

    def __init__(self, accuracy: Callable[[str], float | None], held: Callable[[str], int],
                 coalescer: Callable[[str], Any], parallel: Callable[[str], int],
                 summary: Callable[[str], list] | None = None) -> None:
        self.accuracy = accuracy  # variant -> its offline figure
        self.held, self.coalescer, self.parallel, self.summary = held, coalescer, parallel, summary
        self.samples: dict[str, deque[tuple[float, float]]] = {}  # variant -> (monotonic time, service seconds)
        self.online: dict[str, dict[str, float]] = {}  # route -> variant -> online accuracy that counts
        self.online_at: dict[str, float] = {}  # route -> when its online figures were last asked for

    @classmethod
    def for_gateway(cls, gateway: Any) -> Budget:
        # Read at each request: the gateway's parts may be replaced after start-up (tests' stand-in workers).
        return cls(lambda v: offline_accuracy(getattr(gateway.manifests.get(v), "metrics", None) or {}),
                   lambda v: gateway.admission.held(v), lambda v: gateway.dispatcher.coalescers.get(v),
                   lambda v: gateway.cfg.variants[v].resolved_calls_in_flight,
                   lambda route: gateway.experiments.records.summary(route))

    def service_s(self, variant: str, now: float, probing: bool = False) -> float | None:
        """The median of the variant's recent service times; None once they are older than SAMPLE_MAX_AGE_S,
        unless a request of its own is already measuring it (`probing`): then the old figures stand, so a
        burst does not go to a variant that is being measured again all at once."""
        samples = self.samples.get(variant, ())
        recent = [s for t, s in samples if now - t <= SAMPLE_MAX_AGE_S] or ([s for _, s in samples] if probing else [])
        return statistics.median(recent) if recent else None

    def figures(self, route: str, variant: str, policy: BudgetPolicy | None, now: float) -> Figures:
        """What is known of `variant` now; with no policy (a cascade's stage), its offline accuracy."""
        c = self.coalescer(variant)
        images = c.queued_images + c.in_flight_images if c is not None else 0
        accuracy = self.accuracy(variant)
        if policy is not None and policy.accuracy == "online":
            accuracy = self.online.get(route, {}).get(variant, accuracy)
        ahead = max(self.held(variant), images)
        return Figures(variant, accuracy, ahead, c.seconds_per_image if c is not None else None,
                       c.limit if c is not None else self.parallel(variant), self.service_s(variant, now, ahead > 0))

    def assign(self, route: Any, a: Assignment, header: list[str], images: int,
               down: frozenset[str]) -> Assignment:
        """`a` as the router made it, or the budget's choice on a route with `policy: budget` (the header is
        checked on every route). The router's pick stands when every candidate is down (its 503 or fallback)."""
        asked = parse_header(header)
        policy = route.policy
        if not isinstance(policy, BudgetPolicy) or a.how == "explicit":
            return a
        budget_ms = asked if asked is not None else policy.default_ms
        if budget_ms > policy.max_ms:
            raise ClientError(f"{HEADER}: {budget_ms:g} ms is above the limit of route {route.name!r}, "
                              f"{policy.max_ms:g} ms (routes.{route.name}.policy.budget.max_ms)")
        now = time.monotonic()
        if policy.accuracy == "online":
            self._refresh_online(route.name, policy.online_width, now)
        candidates = [self.figures(route.name, v, policy, now) for v, w in route.split.items()
                      if w > 0 and v not in down]
        if not candidates:
            return a
        choice = choose(candidates, budget_ms, images)
        metrics.BUDGET_CHOICES.labels(route.name, choice.variant).inc()
        if choice.missed:
            metrics.BUDGET_MISSES.labels(route.name, choice.variant, "none_fits").inc()
        shadow = a.shadow if a.shadow != choice.variant else None
        return replace(a, variant=choice.variant, how="budget", shadow=shadow, instead_of=None, budget=choice)

    def sample(self, variant: str, service_s: float) -> None:
        """One image's service time (its latency less its queue wait), for the variant's predictions."""
        self.samples.setdefault(variant, deque(maxlen=SAMPLES)).append((time.monotonic(), max(0.0, service_s)))

    def cascade_cut(self, stages: tuple[str, ...], header: list[str], images: int = 1) -> Cut | None:
        """Where a cascade must end to fit the budget the request sends (None: no header, or every stage
        fits): the most stages whose predicted times, added up, fit it; at least the first. A stage not yet
        measured is taken to fit, as `choose` takes it."""
        budget_ms = parse_header(header)
        if budget_ms is None:
            return None
        now, total, last = time.monotonic(), 0.0, 0
        for i, v in enumerate(stages):
            predicted = self.figures("", v, None, now).predicted_s(images)
            total += (predicted or 0.0) * 1000
            if i > 0 and predicted is not None and total > budget_ms:
                break
            last = i + 1
        return Cut(budget_ms, last, round(total, 2)) if last < len(stages) else None

    def answered(self, a: Assignment, latency_ms: float, waited: float | None = None) -> dict:
        """After an answer: its service time kept (one image, `waited`: its queue wait), and the budget's
        fields for the answer when the budget chose its variant."""
        if waited is not None:
            self.sample(a.variant, latency_ms / 1000 - waited)
        choice = a.budget
        if not isinstance(choice, Choice):
            return {}
        late = latency_ms > choice.budget_ms
        if late and not choice.missed:
            metrics.BUDGET_MISSES.labels(a.route, a.variant, "late").inc()
        return {"budget_ms": choice.budget_ms,
                "predicted_ms": None if choice.predicted_ms is None else round(choice.predicted_ms, 2),
                "chosen_because": choice.reason, "budget_missed": choice.missed or late}

    def _refresh_online(self, route: str, width: float, now: float) -> None:
        """Ask for the route's online figures in the background once `ONLINE_EVERY_S` has passed; the
        request goes on with the figures known now."""
        if self.summary is None or now - self.online_at.get(route, -math.inf) < ONLINE_EVERY_S:
            return
        self.online_at[route] = now
        asyncio.get_running_loop().create_task(self._read_online(route, width))

    async def _read_online(self, route: str, width: float) -> None:
        import anyio.to_thread

        try:
            rows = await anyio.to_thread.run_sync(self.summary, route)
        except Exception as e:  # noqa: BLE001 - the offline figures go on answering
            logger.warning("route %s: the budget's online accuracy was not read: %s: %s", route, type(e).__name__, e)
            return
        # shadow rows do not count: those answers were nobody's
        self.online[route] = {r.variant: acc for r in rows if not r.shadow
                              for acc in [online_accuracy(r.labelled, r.correct, width)] if acc is not None}
