"""The gateway's side of its experiments: answers recorded, feedback taken, results computed.

A route with a `control` runs an experiment. Each of its answers is recorded off the hot path
(`ExperimentRecords.record` only queues), a shadow's answer beside the answer it mirrored; feedback
(`POST /feedback`) labels an answer by the server's `request_id`; `GET /experiments[/ROUTE]` gives each
variant's online accuracy with its 95% Wilson interval and latency, and each variant against the
control: the difference with its always-valid interval, p-value, minimum detectable effect and status
(service/experiments/stats.py).

The database opens on first use (a server without experiments writes nothing) and its blocking calls
run on a thread, never on the event loop.

Prometheus gets each variant's online accuracy with its interval (`effnet_online_accuracy`, service/
metrics.py) from the same counts as GET /experiments: read from the database, not counted in this
process, so that every gateway on a shared database and a restarted one show the whole experiment.
Committed feedback marks its route stale; one background task reads stale routes at most every
`PUBLISH_EVERY_S`, so a burst of feedback costs one summary, and the last feedback of a burst is
still shown.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import anyio.to_thread

from .. import metrics
from ..config import ServingConfig
from ..errors import ClientError
from .records import BadFeedback, ExperimentRecords, FeedbackError, RecordsUnavailable
from .stats import Counts, decide, wilson

MAX_FEEDBACK_ITEMS = 1000  # in one POST /feedback
MAX_FEEDBACK_BYTES = 256 * 1024
# How often the accuracy gauges of a route under feedback are recomputed: a summary reads up to
# RecordSettings.latency_window records per variant, too much per feedback request under load, and
# Prometheus scrapes every few seconds at best.
PUBLISH_EVERY_S = 1.0

logger = logging.getLogger("effnet.experiments")


class Experiments:
    def __init__(self, cfg: ServingConfig, classes: dict[str, list[str]]) -> None:
        self.cfg = cfg  # replaced with the live configuration on a route change (GatewayService.change_route)
        self.classes = classes  # variant -> its class names
        self._records: ExperimentRecords | None = None
        self._stale: set[str] = set()  # routes whose feedback changed since their gauges were set
        self._publisher: asyncio.Task | None = None
        self._published_at = -PUBLISH_EVERY_S  # monotonic time of the last publication

    @property
    def records(self) -> ExperimentRecords:
        if self._records is None:
            try:
                self._records = ExperimentRecords(self.cfg.server.experiments_db or None)
            except Exception as e:  # a database that cannot be opened costs the experiment, never an answer
                logger.exception("experiment records: the database cannot be opened")
                raise RecordsUnavailable(f"the experiment database cannot be opened: {type(e).__name__}") from None
        return self._records

    def _record(self, *args: Any, **kw: Any) -> None:
        try:
            self.records.record(*args, **kw)
        except RecordsUnavailable:
            pass  # logged where the database failed; the answer goes out unrecorded

    def routes(self) -> list[str]:
        return [name for name, r in self.cfg.routes.items() if r.control]

    def needs_token(self) -> bool:
        """Whether POST /feedback must carry the admin token (`server.feedback_auth`): feedback that moves a
        route's traffic (a policy that `uses_feedback`) is an admin's act."""
        auth = self.cfg.server.feedback_auth
        return auth == "token" or (auth == "auto" and any(getattr(r.policy, "uses_feedback", False)
                                                          for r in self.cfg.routes.values()))

    def running(self, route: str) -> bool:
        r = self.cfg.routes.get(route)
        return bool(r and r.control)

    # recording (the hot path: a queue append)

    def answered(self, rid: str, route: str, variant: str, how: str, scores: Any, latency_ms: float,
                 client_id: str | None) -> None:
        if self.running(route):
            top = int(scores.argmax())
            self._record(rid, route, variant, top, float(scores[top]), latency_ms, assignment=how,
                         client_id=client_id)

    def shadowed(self, rid: str, route: str, shadow: str, scores: Any, latency_ms: float) -> None:
        if self.running(route):
            top = int(scores.argmax())
            self._record(f"{rid}.shadow", route, shadow, top, float(scores[top]), latency_ms, shadow_of=rid)

    # feedback

    def _spaces(self) -> set[tuple[str, ...]]:
        """The class lists of the experiments' routes (their controls')."""
        return {tuple(self.classes.get(self.cfg.routes[r].control, [])) for r in self.routes()}

    def _label(self, label: Any, spaces: set[tuple[str, ...]]) -> int:
        """A class index from an index or a class name of `spaces`."""
        if isinstance(label, bool):
            raise BadFeedback(f"label: expected a class name or index, got {label!r}")
        if isinstance(label, int):
            most = max((len(s) for s in spaces), default=0)
            if not 0 <= label < most:
                raise BadFeedback(f"label: index {label} is outside the classes (0..{most - 1})")
            return label
        if isinstance(label, str):
            found = {s.index(label) for s in spaces if label in s}
            if len(found) == 1:
                return found.pop()
            if found:
                raise BadFeedback(f"label: {label!r} names different classes in different routes; send its index")
            known = sorted({c for s in spaces for c in s})
            raise BadFeedback(f"label: unknown class {label[:64]!r}; classes: {', '.join(known[:20])}"
                              + (", ..." if len(known) > 20 else ""))
        raise BadFeedback(f"label: expected a class name or index, got {type(label).__name__}")

    async def feedback(self, body: bytes) -> dict:
        """POST /feedback: {"request_id", "label"} or {"feedback": [...]} -> the result of each, all committed.
        A malformed body raises ClientError; a single item's error is raised; a batch answers per item."""
        if not self.routes():
            raise ClientError("no route runs an experiment: give a route a `control` (routes.NAME.control) to "
                              "record its answers and take feedback", 404)
        if len(body) > MAX_FEEDBACK_BYTES:
            raise ClientError(f"a feedback body is at most {MAX_FEEDBACK_BYTES // 1024} kB; send several", 413)
        try:
            data = json.loads(body or b"null")
        except ValueError as e:
            raise ClientError(f"the body is not JSON: {e}; send {{\"request_id\": ..., \"label\": ...}}") from None
        single = isinstance(data, dict) and "feedback" not in data
        items = [data] if single else (data.get("feedback") if isinstance(data, dict) else None)
        if not isinstance(items, list) or not items:
            raise ClientError('send {"request_id": ID, "label": NAME_OR_INDEX}, or {"feedback": [...]} of them')
        if len(items) > MAX_FEEDBACK_ITEMS:
            raise ClientError(f"at most {MAX_FEEDBACK_ITEMS} feedback items per request; got {len(items)}", 413)
        parsed: list[tuple[str, int] | FeedbackError] = []
        spaces = self._spaces()
        for item in items:
            try:
                if not isinstance(item, dict) or set(item) - {"request_id", "label"} or not {"request_id",
                                                                                               "label"} <= set(item):
                    raise BadFeedback('each item is {"request_id": ID, "label": NAME_OR_INDEX}')
                parsed.append((item["request_id"], self._label(item["label"], spaces)))
            except FeedbackError as e:
                parsed.append(e)
        todo = [p for p in parsed if not isinstance(p, FeedbackError)]
        done = iter(await anyio.to_thread.run_sync(self.records.add_feedbacks, todo) if todo else [])
        results = [p if isinstance(p, FeedbackError) else next(done) for p in parsed]
        for r in results:
            if not isinstance(r, FeedbackError):
                metrics.FEEDBACK.labels(r.route, r.variant, str(r.correct).lower()).inc()
                for shadow, correct in r.shadows:
                    metrics.FEEDBACK.labels(r.route, shadow, str(correct).lower()).inc()
                self._stale.add(r.route)
        self._publish_soon()
        if single and isinstance(results[0], FeedbackError):
            raise results[0]
        asked = [item.get("request_id") if isinstance(item, dict) else None for item in items]
        out = [{"request_id": rid if isinstance(rid, str) else None, "status": r.status, "error": str(r)}
               if isinstance(r, FeedbackError) else
               {"request_id": r.request_id, "status": 200, "route": r.route, "variant": r.variant, "label": r.label,
                "correct": r.correct, "shadows": [{"variant": v, "correct": c} for v, c in r.shadows]}
               for rid, r in zip(asked, results)]
        return out[0] if single else {"results": out}

    # results

    async def results(self, route: str | None = None, history: bool = False) -> dict:
        """GET /experiments (every route with a control) or /experiments/ROUTE (`history`: with its accuracy
        over time, service/experiments/history.py)."""
        names = self.routes()
        if route is not None:
            if route not in self.cfg.routes:
                raise ClientError(f"unknown route {route[:64]!r}; routes: {', '.join(self.cfg.routes)}", 404)
            if route not in names:
                raise ClientError(f"route {route!r} runs no experiment: give it a `control` (routes.{route}.control)",
                                  404)
            names = [route]
        out = {}
        for name in names:
            rows = await anyio.to_thread.run_sync(self.records.summary, name)
            publish_accuracy(name, rows)
            out[name] = self._result(name, rows)
            if history:
                out[name]["history"] = await anyio.to_thread.run_sync(self.records.history, name)
        return out[route] if route is not None else {"experiments": out}

    def _result(self, route: str, rows: list) -> dict:
        control = self.cfg.routes[route].control
        served = {r.variant: r for r in rows if not r.shadow}
        ctrl = served.get(control)
        ctrl_counts = Counts(ctrl.labelled, ctrl.correct) if ctrl else Counts(0, 0)
        variants = []
        for r in sorted(rows, key=lambda r: (r.shadow, r.variant != control, r.variant)):
            lo, hi = wilson(r.correct, r.labelled)
            row = {"variant": r.variant, "role": "shadow" if r.shadow else "control" if r.variant == control
                   else "treatment", "requests": r.requests, "labelled": r.labelled, "correct": r.correct,
                   "accuracy": r.accuracy, "accuracy_95": [round(lo, 4), round(hi, 4)],
                   "latency_ms": {"p50": r.p50_ms, "p95": r.p95_ms, "p99": r.p99_ms}}
            if r.variant != control or r.shadow:
                row["vs_control"] = decide(ctrl_counts, Counts(r.labelled, r.correct)).as_dict()
            variants.append(row)
        decided = [v["vs_control"]["status"] for v in variants if v["role"] == "treatment"]
        return {"route": route, "control": control, "variants": variants,
                "status": "collecting" if not decided or "collecting" in decided else
                ("better" if "better" in decided else "worse" if set(decided) == {"worse"} else "no_difference")}

    # the accuracy gauges

    def _publish_soon(self) -> None:
        """Have the stale routes' gauges set by the publisher task, started if none runs on this loop."""
        if self._stale and (self._publisher is None or self._publisher.done()):
            self._publisher = asyncio.get_running_loop().create_task(self._publish())

    async def _publish(self) -> None:
        while self._stale:
            wait = self._published_at + PUBLISH_EVERY_S - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            routes, self._stale = self._stale, set()
            self._published_at = time.monotonic()
            for route in sorted(routes):
                try:
                    publish_accuracy(route, await anyio.to_thread.run_sync(self.records.summary, route))
                except Exception as e:  # noqa: BLE001 - the gauges wait for the next feedback; answers go on
                    logger.warning("experiment %s: accuracy gauges not updated: %s: %s", route, type(e).__name__, e)

    async def published(self) -> None:
        """Return once the gauges show every feedback committed before the call."""
        while self._publisher is not None and not self._publisher.done():
            await asyncio.shield(self._publisher)

    def close(self) -> None:
        if self._publisher is not None:
            self._publisher.cancel()
        if self._records is not None:
            self._records.close()


def publish_accuracy(route: str, rows: list) -> None:
    """Set `effnet_online_accuracy` from a route's summary (records.VariantSummary rows): per variant with
    feedback, served and shadow apart, the accuracy and its 95% Wilson bounds. A variant without feedback
    has no series: nothing is known of it yet."""
    for r in rows:
        if r.labelled:
            low, high = wilson(r.correct, r.labelled)
            for bound, value in zip(metrics.ACCURACY_BOUNDS, (r.correct / r.labelled, low, high)):
                metrics.ONLINE_ACCURACY.labels(route, r.variant, str(r.shadow).lower(), bound).set(value)
