"""A confidence cascade: cheap variants first, a stronger one only for the images they are unsure of.

    routes:
      fashion:
        split: [compact, b0]            # the stages are variants of the route's split
        policy: {cascade: {stages: [compact, b0], thresholds: [0.8], average_last: false}}
        # or, with the thresholds `effnet cascade fit fashion` chose on the validation split:
        # policy: {cascade: {stages: [compact, b0], thresholds_file: cascade-fashion.yaml}}

A request runs stage 1; when its top-1 probability (calibrated: the worker divides the logits by the
manifest's temperature) reaches stage 1's threshold, that is the answer, else stage 2 runs, and so on.
The last stage always answers; with `average_last` its answer is the mean of the probabilities of every
stage that ran ("Wisdom of Committees", Wang et al., ICLR 2022). A threshold above 1 always escalates.
A stage that is down, not ready, at capacity, failing or past its deadline escalates too; when the last
stage fails, the deepest stage that answered stands, and with none the last refusal is the answer.

A client that names a `variant` gets that variant alone, as in any route. The route's split weights play
no part in a cascade. `thresholds_file` is read where the configuration is parsed (relative to the
configuration file's folder); GET /routes shows it beside the thresholds read from it.

A latency budget may end a cascade early: with `X-Latency-Budget-Ms`, the stages run are the most whose
predicted times add up within it (at least the first; service.budget.Budget.cascade_cut), and the answer
says where it was cut (`cascade_cut_after`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import numpy as np

from . import metrics
from .errors import ClientError
from .results import InferenceResult

KEYS = ("stages", "thresholds", "thresholds_file", "average_last")
OUTCOMES = ("answered", "escalated", "failed")  # effnet_cascade_stages{outcome}


@dataclass(frozen=True)
class CascadePolicy:
    stages: tuple[str, ...]
    thresholds: tuple[float, ...]  # one per stage but the last
    average_last: bool = False
    thresholds_file: str | None = None  # where the thresholds were read from (absolute), if from a file

    name = "cascade"
    # The gateway's policy loop recomputes splits every `every_s`; a cascade has no split to move.
    every_s = math.inf
    uses_feedback = False  # feedback moves nothing here: POST /feedback needs no admin token for it

    def as_dict(self) -> dict:
        return {"cascade": {"stages": list(self.stages), "thresholds": list(self.thresholds),
                            **({"thresholds_file": self.thresholds_file} if self.thresholds_file else {}),
                            "average_last": self.average_last}}

    def next_split(self, split: dict[str, float], rows: list, control: str | None, rng: Any = None) -> dict[str, float]:
        return dict(split)


def _thresholds(where: str, raw: Any, stages: tuple[str, ...]) -> tuple[float, ...]:
    if not isinstance(raw, list) or len(raw) != len(stages) - 1:
        raise ValueError(f"{where}: expected a list of {len(stages) - 1} number(s), one per stage but the last "
                         f"({', '.join(stages[:-1])}), got {raw!r}")
    for t in raw:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"{where}: a threshold is a calibrated probability, a number >= 0 (above 1: always "
                             f"escalate), got {t!r}")
    return tuple(float(t) for t in raw)


def read_thresholds_file(where: str, path: str, stages: tuple[str, ...]) -> tuple[float, ...]:
    """The thresholds in a file that `effnet cascade fit` wrote, checked against the route's stages."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{where}: {path} does not exist; `effnet cascade fit ROUTE` writes it") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{where}: {path} cannot be read as YAML: {e}") from None
    if not isinstance(data, dict) or "thresholds" not in data:
        raise ValueError(f"{where}: {path} has no `thresholds`; `effnet cascade fit ROUTE` writes it")
    if data.get("stages") is not None and tuple(data["stages"]) != stages:
        raise ValueError(f"{where}: {path} was fitted for the stages {data['stages']}, the route's are "
                         f"{list(stages)}; run `effnet cascade fit` again")
    return _thresholds(f"{where} ({path})", data["thresholds"], stages)


def parse_cascade(where: str, raw: Any, split: dict[str, float]) -> CascadePolicy:
    """`routes.NAME.policy.cascade` -> CascadePolicy; raises ValueError naming the key."""
    where = f"{where}.policy.cascade"
    if not isinstance(raw, dict) or set(raw) - set(KEYS):
        raise ValueError(f"{where}: expected a mapping with the keys {', '.join(KEYS)}, got {raw!r}")
    stages = raw.get("stages")
    if (not isinstance(stages, list) or len(stages) < 2 or len(set(map(str, stages))) != len(stages)
            or not all(isinstance(s, str) for s in stages)):
        raise ValueError(f"{where}.stages: expected two or more different variants, cheapest first, got {stages!r}")
    outside = [s for s in stages if s not in split]
    if outside:
        raise ValueError(f"{where}.stages: {outside} not in the route's split ({', '.join(split)}); list every "
                         "stage there (a cascade does not use the weights)")
    stages = tuple(stages)
    average = raw.get("average_last", False)
    if not isinstance(average, bool):
        raise ValueError(f"{where}.average_last: expected true or false, got {average!r}")
    file = raw.get("thresholds_file")
    if file is not None:
        if not isinstance(file, str) or not file:
            raise ValueError(f"{where}.thresholds_file: expected a file name, got {file!r}")
        # The file is the one place of fitted thresholds: a `thresholds` list beside it (as GET /routes
        # shows it) is what was read last time, and is read again here.
        return CascadePolicy(stages, read_thresholds_file(f"{where}.thresholds_file", file, stages), average, file)
    if "thresholds" not in raw:
        raise ValueError(f"{where}: give `thresholds` (one per stage but the last) or `thresholds_file` (written "
                         "by `effnet cascade fit ROUTE`)")
    return CascadePolicy(stages, _thresholds(f"{where}.thresholds", raw["thresholds"], stages), average)


def files_beside(route: Any, source: str) -> Any:
    """A route's settings with a relative `thresholds_file` made absolute against the configuration file's
    folder, where `effnet cascade fit` writes it; anything else as it is."""
    try:
        c = route["policy"]["cascade"]
        file = c["thresholds_file"]
    except (KeyError, TypeError):
        return route
    if not isinstance(file, str) or not file or Path(file).is_absolute() or not Path(source).is_file():
        return route
    absolute = str(Path(source).resolve().parent / file)
    return {**route, "policy": {**route["policy"], "cascade": {**c, "thresholds_file": absolute}}}


def cascade_of(route: Any, how: str) -> CascadePolicy | None:
    """The route's cascade when it decides this request (an explicit variant answers alone)."""
    return route.policy if isinstance(route.policy, CascadePolicy) and how != "explicit" else None


# one request ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Step:
    variant: str
    result: InferenceResult | None = None
    escalated: bool = False
    error: str | None = None


@dataclass(frozen=True)
class Outcome:
    variant: str  # the stage whose answer stands
    scores: np.ndarray  # its probabilities (the mean of those seen, with average_last at the last stage)
    steps: list[Step]
    averaged: bool = False


Call = Callable[[str], Awaitable[InferenceResult]]


def confident(scores: np.ndarray, threshold: float) -> bool:
    return float(np.max(scores)) >= threshold


async def run_stages(policy: CascadePolicy, call: Call, last: int | None = None) -> Outcome:
    """Run the stages in order until one is sure (or the last answers). `call(variant)` is one stage's
    answer for the request's image; a ClientError from it of 429 or 5xx (down, busy, failing, too slow)
    escalates, any other (the image itself is bad) is the answer. `last` ends the cascade early."""
    stages = policy.stages[:last] if last else policy.stages
    steps: list[Step] = []
    refusal: ClientError | None = None
    for i, variant in enumerate(stages):
        final = i == len(stages) - 1
        try:
            result = await call(variant)
        except ClientError as e:
            if e.status != 429 and e.status < 500:
                raise
            refusal = e
            steps.append(Step(variant, escalated=not final, error=str(e)))
            continue
        scores = result.scores[0]
        if final or confident(scores, policy.thresholds[i]):
            steps.append(Step(variant, result))
            averaged = final and policy.average_last and len([s for s in steps if s.result is not None]) > 1
            if averaged:
                scores = np.mean([s.result.scores[0] for s in steps if s.result is not None], axis=0)
            return Outcome(variant, scores, steps, averaged)
        steps.append(Step(variant, result, escalated=True))
    answered = [s for s in steps if s.result is not None]
    if not answered:
        raise refusal  # every stage refused: the last refusal says why
    deepest = answered[-1]  # the last stage failed: the most trusted answer there is
    return Outcome(deepest.variant, deepest.result.scores[0], steps)


def describe_steps(steps: list[Step], policy: CascadePolicy, classes: list[str]) -> list[dict]:
    """The answer's `cascade`: every stage run, what it said and whether it passed the image on."""
    out = []
    for i, s in enumerate(steps):
        row: dict = {"variant": s.variant}
        if s.result is not None:
            scores = s.result.scores[0]
            top = int(np.argmax(scores))
            row.update(top1=classes[top] if top < len(classes) else top, index=top,
                       score=round(float(scores[top]), 6))
        row["threshold"] = policy.thresholds[i] if i < len(policy.thresholds) else None
        row["escalated"] = s.escalated
        if s.error:
            row["error"] = s.error
        out.append(row)
    return out


def count(route: str, steps: list[Step]) -> None:
    """`effnet_cascade_stages`: each stage run, by whether it answered, passed the image on, or failed."""
    for s in steps:
        outcome = "failed" if s.error else "escalated" if s.escalated else "answered"
        metrics.CASCADE_STAGES.labels(route, s.variant, outcome).inc()


async def classify(gw: Any, rid: str, t0: float, a: Any, top_k: int, data: bytes, client: str | None,
                   labels: list[str]) -> dict:
    """One /classify request of a cascade route, through the gateway `gw`: each stage with its own
    readiness, admission, decoding and dispatch, as a request for that variant alone would have."""
    policy = gw.cfg.routes[a.route].policy
    out = await run_stages(policy, stage_call(gw, a.route, data), a.budget.last if a.budget is not None else None)
    labels[:] = [a.route, out.variant]
    return answer(gw, rid, t0, a, top_k, out, client)


def stage_call(gw: Any, route: str, data: bytes) -> Call:
    """One stage's answer for an encoded image, through the gateway `gw`."""
    from .errors import retry_later

    async def call(variant: str) -> InferenceResult:
        if gw.health.is_down(variant):
            raise gw.dispatcher.down(variant)
        if (why := gw.readiness.problem(variant, gw.manifests)) is not None:
            raise retry_later(f"variant {variant!r} is not ready: {why}", gw.cfg.server.retry_after_s)
        with gw.admission.hold(variant):
            gw.dispatcher.check_capacity(variant, 1)
            batch = await gw.decoder.prepare(data, variant)
            t0 = time.perf_counter()
            result = await gw.dispatcher.infer(variant, batch)
        metrics.QUEUE_WAIT.labels(route, variant).observe(result.waited)
        gw.budget.sample(variant, time.perf_counter() - t0 - result.waited)  # what a budget predicts stages from
        return result

    return call


def answer(gw: Any, rid: str, t0: float, a: Any, top_k: int, out: Outcome, client: str | None) -> dict:
    """The answer body of one image that went through the cascade, counted and recorded."""
    from dataclasses import replace

    policy = gw.cfg.routes[a.route].policy
    count(a.route, out.steps)
    final = replace(a, variant=out.variant)
    metrics.ASSIGNMENTS.labels(a.route, out.variant, "cascade").inc()
    version = next((s.result.version for s in reversed(out.steps) if s.result is not None and s.variant == out.variant),
                   "")
    body = gw._answer(rid, final, out.scores, top_k, t0, version)
    body["cascade"] = describe_steps(out.steps, policy, gw.manifests[out.variant].classes)
    if out.averaged:
        body["averaged"] = [s.variant for s in out.steps if s.result is not None]
    if a.budget is not None:  # the request's latency budget ended the cascade early (service.budget.Cut)
        body.update(a.budget.fields(policy.stages))
    gw.experiments.answered(rid, a.route, out.variant, "cascade", out.scores, body["latency_ms"], client)
    return body


def assign(gw: Any, a: Any, policy: CascadePolicy, raw_top_k: str | None) -> tuple[Any, int]:
    """The request's assignment to the cascade (its variant: the first stage, until one answers) and its
    top_k, checked against the route's classes as known from any stage that has loaded (they share one
    label space); no stage checks here: a stage that cannot answer escalates when its turn comes."""
    from dataclasses import replace

    from . import forms
    from .errors import retry_later

    first = next((s for s in policy.stages if s in gw.manifests), None)
    if first is None:
        raise retry_later(f"route {a.route!r}: no stage of its cascade has loaded yet", gw.cfg.server.retry_after_s)
    k = forms.top_k(raw_top_k, first, gw.manifests[first].num_classes, gw.cfg.server.max_top_k)
    return replace(a, variant=policy.stages[0], how="cascade", shadow=None, instead_of=None), k


async def classify_batch(gw: Any, rid: str, t0: float, a: Any, top_k: int, files: list, client: str | None) -> dict:
    """A /classify_batch request of a cascade route: each image goes through the cascade on its own, all
    at once, so a stage's coalescer still batches them; a bad image fails its item alone."""
    import asyncio

    from starlette.datastructures import UploadFile

    from store.images import ImageError

    policy = gw.cfg.routes[a.route].policy

    async def item(i: int, f: Any) -> dict:
        name = getattr(f, "filename", None)
        try:
            if not isinstance(f, UploadFile):
                raise ImageError("this item is a text value, not a file")
            out = await run_stages(policy, stage_call(gw, a.route, await f.read()),
                                   a.budget.last if a.budget is not None else None)
        except (ImageError, ClientError) as e:
            metrics.REQUESTS.labels("classify_batch", a.route, "none", str(e.status)).inc()
            return {"index": i, "filename": name, "status": e.status, "error": str(e)}
        metrics.REQUESTS.labels("classify_batch", a.route, out.variant, "200").inc()
        return {"index": i, "filename": name, "status": 200, **answer(gw, f"{rid}-{i}", t0, a, top_k, out, client)}

    results = await asyncio.gather(*(item(i, f) for i, f in enumerate(files)))
    return {"request_id": rid, "route": a.route, "assignment": "cascade", "results": list(results),
            "latency_ms": round((time.perf_counter() - t0) * 1000, 2)}
