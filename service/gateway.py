"""The gateway's request path: parse -> route -> decode -> dispatch -> answer.

Each step is a module of its own: `http_limits` (body size and time, the total in-flight backstop,
before this runs), `forms` (the multipart form and its fields), `routing` (which variant answers, its
fallback while it is down), `admission` (a place among the variant's own in-flight requests),
`decode` (bytes -> the variant's input), `dispatch` (coalescing, replicas, deadlines, retries,
transport), `shadow` (mirrored requests). Around it: `health` (which worker replicas answer, checked in
the background), `readiness`, `live_routes` (PATCH /routes), `describe` (GET /variants, /routes), and
`endpoints`, the route table. `app.py` builds the BentoML service class on `GatewayService`.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
import time
from dataclasses import replace
from typing import Any, Awaitable, Callable

import bentoml
import numpy as np
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from . import cascade, describe, forms, metrics
from .admission import Admission
from .budget import HEADER as BUDGET_HEADER
from .budget import Budget, images_in
from .config import ConfigError, ServingConfig, check_label_spaces
from .decode import Decoder
from .dispatch import Dispatcher
from .errors import ClientError, error_response, request_id, retry_later
from .experiments.live import Experiments
from .heap import freeze_startup_heap, watch_collector
from .images import ImageError
from .inprocess import InProcessVariant
from .live_routes import LiveRoutes, publish_splits
from .readiness import Readiness, VariantInfo
from .routing import Assignment, Router, RoutingError
from .shadow import Shadows
from .versions import Versions, base_of
from .worker_app import worker_token

logger = logging.getLogger("effnet.gateway")


class GatewayService:
    """The gateway's state and request handling; `app.py` makes the BentoML service class from it."""

    cfg: ServingConfig
    worker_attrs: dict[str, list[str]]  # variant -> the attributes holding its replicas' bentoml.depends proxies
    remote_services: dict[str, Any]  # variant with `workers_at` -> its worker's service class (service/remote_workers.py)

    def __init__(self) -> None:
        import torch

        from store import CheckpointError, read_manifest

        # The gateway's torch work is resizing one decoded image at a time: intra-op threads would only
        # add OpenMP helpers that spin on the cores the workers' slots hand out.
        torch.set_num_threads(1)
        # store.resize_crop imports torchvision on first use (about 2 s): pay it here, not on a request.
        import torchvision.transforms.v2.functional  # noqa: F401

        watch_collector("effnet-gateway", "none")
        manifests: dict[str, Any] = {}
        problems: dict[str, str] = {}
        tags: dict[str, str] = {}  # the exact tag of each configured checkpoint: its version (service/versions.py)
        for name, v in self.cfg.variants.items():
            try:
                manifests[name], folder = read_manifest(v.model)
                tags[name] = f"{folder.parent.name}:{folder.name}"
            except CheckpointError as e:
                problems[name] = f"variant {name!r}, checkpoint {v.model!r}: {e}"
                logger.error("effnet gateway: %s", problems[name])
        # Variants with `placement: gateway` run in this process, loading in a thread while the server
        # already answers; the others are reached through their workers' proxies.
        local = {name: InProcessVariant(v, self.cfg, torch.cuda.is_available())
                 for name, v in self.cfg.variants.items() if v.placement == "gateway"}
        self.assemble(manifests, problems, local, tags)

    def assemble(self, manifests: dict[str, Any], problems: dict[str, str], local: dict[str, InProcessVariant],
                 tags: dict[str, str] | None = None) -> None:
        """Every part of the request path, from the configuration and what start-up found: the variants'
        manifests, the problems of those that cannot serve, and the variants served in this process."""
        self.manifests = manifests
        # What workers this gateway calls over the network ask of it: the configured token, else one of its
        # own for the versions it starts (service/worker_app.py).
        token = worker_token() or secrets.token_urlsafe(24)
        self.dispatcher = Dispatcher(self.cfg, self.replicas, local,
                                     {name: len(attrs) for name, attrs in self.worker_attrs.items()},
                                     self.worker_service, token)
        tags = {n: (tags or {}).get(n, v.model) for n, v in self.cfg.variants.items()}
        self.versions = self.dispatcher.versions = Versions(tags, manifests, self.dispatcher, self.cfg.source, token,
                                                            lambda key: bool(self.health.usable(key)))
        self.decoder = Decoder(self.manifests, self.cfg.server.max_pixels, self.cfg.server.max_decoding_pixels,
                               self.cfg.server.decode_nice)
        self.shadows = Shadows(self.dispatcher, self.manifests)
        self.health = self.dispatcher.health
        self.health.after_round = self._after_health_round
        self.admission = Admission.from_config(self.cfg)
        self.info = VariantInfo()
        classes = {n: m.classes for n, m in self.manifests.items()}
        self.live = LiveRoutes(self.cfg)
        self.cfg = self.live.restore(self.cfg, classes)
        self.readiness = Readiness(self.cfg, self.health, problems)
        self.router = Router(self.cfg)
        self.experiments = Experiments(self.cfg, classes)
        self.shadows.answered = self.experiments.shadowed
        self.budget = Budget.for_gateway(self)  # routes with `policy: budget` (service/budget.py)
        publish_splits(self.cfg, self.cfg.routes.values())
        try:
            check_label_spaces(self.cfg, classes)
        except ConfigError as e:
            self.readiness.config_error = f"configuration error in {self.cfg.source}: {e}"
            logger.error("effnet gateway: %s", self.readiness.config_error)

    def worker_service(self, key: str) -> Any:
        """The worker service class of a variant (or a version's key) served elsewhere: the shape of its API."""
        name = base_of(key)
        if name not in self.remote_services:
            from .worker_app import gpu_present
            from .workers import make_worker, service_name

            self.remote_services[name] = make_worker(self.cfg.variants[name], self.cfg, gpu_present(), service_name(name))
        return self.remote_services[name]

    def replicas(self, variant: str) -> list[Any]:
        """The proxies of a variant's worker processes (service.workers.worker_names)."""
        return [getattr(self, attr) for attr in self.worker_attrs[variant]]

    @bentoml.on_startup
    def start_health_checks(self) -> None:
        """Check every worker replica in the background from now on (service/health.py), and run the routes'
        policies (service/experiments/policy.py)."""
        self.dispatcher.remote.start()  # workers elsewhere: resolve their addresses (service/remote_workers.py)
        self.versions.restore()  # the versions loaded before a restart (service/versions.py)
        self.health.start()
        # Policies come from the configuration file only (PATCH /routes keeps them, adds none); budget and
        # cascade choose per request (every_s is infinite) and need no loop.
        if any(r.policy is not None and math.isfinite(r.policy.every_s) for r in self.cfg.routes.values()):
            self.policy_task = asyncio.get_running_loop().create_task(self._run_policies())

    async def _run_policies(self) -> None:
        """Every second, the routes whose policy is due get the split it computes from their feedback."""
        import anyio.to_thread

        from .experiments.policy import moved
        last: dict[str, float] = {}
        while True:
            await asyncio.sleep(1.0)
            for name, route in list(self.cfg.routes.items()):
                if route.policy is None or time.monotonic() - last.get(name, -1e9) < route.policy.every_s:
                    continue
                last[name] = time.monotonic()
                try:
                    rows = await anyio.to_thread.run_sync(self.experiments.records.summary, name)
                    split = route.policy.next_split(route.split, rows, route.control)
                    if moved(route.split, split):
                        self.apply_policy(name, route.policy.name, route.split, split)
                except Exception as e:  # noqa: BLE001 - a round that fails leaves the split as it is
                    logger.warning("route %s: its policy did not run: %s", name, e)

    @bentoml.on_shutdown
    async def stop_health_checks(self) -> None:
        if getattr(self, "policy_task", None) is not None:
            self.policy_task.cancel()
        await self.versions.close()
        await self.dispatcher.remote.stop()
        await self.health.stop()
        self.experiments.close()  # writes the answers still queued
        # The last word of a gateway that stops by itself; one ended by the drain's watchdog never says it.
        logger.warning("gateway %d: shut down", os.getpid())

    def _after_health_round(self) -> None:
        reasons = self.readiness.refresh()
        if not reasons and not self.readiness.published:
            self.readiness.published = True
            self.info.publish(self.cfg, self.manifests, self.readiness.status)
            # Everything start-up built stays for the life of the process: out of the collector's full
            # passes with it (service/heap.py).
            freeze_startup_heap("effnet-gateway", "none")

    async def __is_ready__(self) -> bool:
        """Ready under `server.readiness` as the last health checks found it; else 503 with the reasons.
        Never waits on a worker (service/readiness.py)."""
        reasons = self.readiness.refresh()
        if reasons or not self.readiness.published:
            raise HTTPException(status_code=503, detail="not ready: " + ("; ".join(reasons) or "first checks running"))
        return True

    def variant_readiness(self, variant: str) -> dict:
        """GET /readyz/VARIANT (raises KeyError for an unknown variant)."""
        if variant not in self.cfg.variants:
            raise KeyError(variant)
        return self.readiness.variant(variant)

    # the request path ---------------------------------------------------------------------------------

    async def classify(self, request: Request) -> JSONResponse:
        async def one(rid: str, t0: float, labels: list[str]) -> dict:
            form, a, top_k = await self._route(request, forms.CLASSIFY_FIELDS)
            labels[:] = [a.route, a.variant]
            image = forms.one_image(form)
            if a.how == "cascade":  # service/cascade.py: stage after stage, each checked and admitted alone
                return await cascade.classify(self, rid, t0, a, top_k, await image.read(),
                                              request.headers.get("x-client-id"), labels)
            with self.admission.hold(a.variant):
                self.dispatcher.check_capacity(a.variant, 1)
                batch = await self.decoder.prepare(await image.read(), a.variant)
                result = await self.dispatcher.infer(a.variant, batch)
            metrics.QUEUE_WAIT.labels(a.route, a.variant).observe(result.waited)
            metrics.ASSIGNMENTS.labels(a.route, a.variant, a.how).inc()
            body = self._answer(rid, a, result.scores[0], top_k, t0, result.version)
            body.update(self.budget.answered(a, body["latency_ms"], result.waited))
            self.experiments.answered(rid, a.route, a.variant, a.how, result.scores[0], body["latency_ms"],
                                      request.headers.get("x-client-id"))
            if a.shadow:
                self.shadows.mirror(a, batch, [body["predictions"][0]["index"]], [rid])
            return body

        return await self._respond("classify", one)

    async def classify_batch(self, request: Request) -> JSONResponse:
        async def several(rid: str, t0: float, labels: list[str]) -> dict:
            form, a, top_k = await self._route(request, forms.BATCH_FIELDS)
            labels[:] = [a.route, a.variant]
            files = forms.batch_images(form, self.cfg.server.max_batch_images)
            if a.how == "cascade":  # service/cascade.py: every image through the stages on its own
                return await cascade.classify_batch(self, rid, t0, a, top_k, files, request.headers.get("x-client-id"))
            with self.admission.hold(a.variant):
                return await classify_images(rid, t0, a, top_k, files)

        async def classify_images(rid: str, t0: float, a: Assignment, top_k: int, files: list) -> dict:
            self.dispatcher.check_capacity(a.variant, len(files))
            results: list[dict | None] = [None] * len(files)
            good: list[tuple[int, np.ndarray]] = []
            for i, f in enumerate(files):  # a bad image fails its item alone
                try:
                    if not isinstance(f, UploadFile):
                        raise ImageError("this item is a text value, not a file")
                    good.append((i, await self.decoder.prepare(await f.read(), a.variant)))
                except ImageError as e:
                    results[i] = {"index": i, "filename": getattr(f, "filename", None), "status": e.status,
                                  "error": str(e)}
                    metrics.REQUESTS.labels("classify_batch", a.route, a.variant, str(e.status)).inc()
            if good:
                batch = np.concatenate([b for _, b in good])
                result = await self.dispatcher.infer(a.variant, batch)
                metrics.QUEUE_WAIT.labels(a.route, a.variant).observe(result.waited)
                for (i, _), row in zip(good, result.scores):
                    item = self._answer(f"{rid}-{i}", a, row, top_k, t0, result.version)
                    item.update(self.budget.answered(a, item["latency_ms"]))
                    self.experiments.answered(f"{rid}-{i}", a.route, a.variant, a.how, row, item["latency_ms"],
                                              request.headers.get("x-client-id"))
                    results[i] = {"index": i, "filename": getattr(files[i], "filename", None), "status": 200, **item}
                    metrics.ASSIGNMENTS.labels(a.route, a.variant, a.how).inc()
                    metrics.REQUESTS.labels("classify_batch", a.route, a.variant, "200").inc()
                if a.shadow:
                    self.shadows.mirror(a, batch, [results[i]["predictions"][0]["index"] for i, _ in good],
                                        [f"{rid}-{i}" for i, _ in good])
            return {"request_id": rid, "route": a.route, "variant": a.variant, "assignment": a.how,
                    **({"instead_of": a.instead_of} if a.instead_of else {}), "results": results,
                    "latency_ms": round((time.perf_counter() - t0) * 1000, 2)}

        return await self._respond("classify_batch", several)

    async def _route(self, request: Request, allowed: frozenset[str]) -> tuple[Any, Assignment, int]:
        """Parse and route: the form, the variant's assignment, and top_k checked against its classes."""
        f = await forms.read_form(request, allowed, self.cfg.server.max_batch_images)
        try:
            down = self.health.down_variants()
            a = self.router.assign(f.route, f.variant, f.client_id, down)
        except RoutingError as e:
            raise ClientError(str(e)) from None
        a = self.budget.assign(self.cfg.routes[a.route], a, request.headers.getlist(BUDGET_HEADER), images_in(f.form),
                               down)
        if (c := cascade.cascade_of(self.cfg.routes[a.route], a.how)) is not None:
            a, k = cascade.assign(self, a, c, f.top_k)
            # a budget the request sends may end the cascade early (service.budget.Budget.cascade_cut)
            return f.form, replace(a, budget=self.budget.cascade_cut(c.stages, request.headers.getlist(BUDGET_HEADER),
                                                                     images_in(f.form))), k
        if self.health.is_down(a.variant):  # answered now, not after a call's deadline
            raise self.dispatcher.down(a.variant)
        if (why := self.readiness.problem(a.variant, self.manifests)) is not None:
            raise retry_later(f"variant {a.variant!r} is not ready: {why}", self.cfg.server.retry_after_s)
        m = self.manifests[a.variant]
        return f.form, a, forms.top_k(f.top_k, a.variant, m.num_classes, self.cfg.server.max_top_k)

    def _answer(self, rid: str, a: Assignment, scores: np.ndarray, top_k: int, t0: float, version: str = "") -> dict:
        """The body of one image's answer; `version` is the store tag that answered (default: the variant's
        configured checkpoint)."""
        classes = self.manifests[a.variant].classes
        idx = np.argsort(-scores, kind="stable")[:top_k]
        preds = [{"label": classes[i], "index": int(i), "score": round(float(scores[i]), 6)} for i in idx]
        metrics.TOP1_SCORE.labels(a.route, a.variant).observe(preds[0]["score"])
        return {"request_id": rid, "route": a.route, "variant": a.variant, "model": self.cfg.variants[a.variant].model,
                "version": version or self.versions.tag_of(a.variant), "assignment": a.how, **({"instead_of": a.instead_of} if a.instead_of else {}), "predictions": preds, "latency_ms": round((time.perf_counter() - t0) * 1000, 2)}

    async def _respond(self, endpoint: str, handle: Callable[[str, float, list[str]], Awaitable[dict]]) -> JSONResponse:
        """Run `handle` and answer: 200 with its body, a refusal's status and message, or 500 for a fault of
        ours (left to the ASGI server, it would close the client's keep-alive connection and skip the
        metrics); a cancelled request (its client left, service.http_limits) counts as 499, nginx's code.
        /classify counts one request; /classify_batch counts each image, and a refusal once."""
        t0, rid = time.perf_counter(), request_id()
        labels = ["none", "none"]  # route, variant: known once routed
        try:
            body = await handle(rid, t0, labels)
            status, resp = 200, JSONResponse(body, headers={"X-Request-Id": rid})
        except (ClientError, ImageError) as e:
            status, resp = e.status, error_response(rid, e.status, str(e), getattr(e, "headers", None))
        except Exception as e:  # noqa: BLE001 - our fault: answer and count it
            logger.error("request %s failed", rid, exc_info=e)
            status, resp = 500, error_response(rid, 500, f"internal error ({type(e).__name__}); the server log "
                                                         f"names request {rid}")
        except asyncio.CancelledError:
            metrics.REQUESTS.labels(endpoint, *labels, "499").inc()
            raise
        if status != 200 or endpoint == "classify":  # a batch's answered images are counted one by one
            metrics.REQUESTS.labels(endpoint, *labels, str(status)).inc()
        metrics.E2E_LATENCY.labels(endpoint, *labels).observe(time.perf_counter() - t0)
        return resp

    # route changes and descriptions ----------------------------------------------------------------------

    def change_route(self, name: str, change: Any) -> dict:
        """PATCH /routes/NAME (service.live_routes): the route as changed, and as it was."""
        old = self.cfg.routes.get(name)
        previous = describe.routes_of([old], self.manifests, self.live.changed_at)[name] if old else None
        route, self.cfg = self.live.change(self.cfg, name, change, {n: m.classes for n, m in self.manifests.items()},
                                           lambda v: self.readiness.problem(v, self.manifests))
        self.router.cfg = self.readiness.cfg = self.experiments.cfg = self.cfg
        if self.readiness.published:
            self.info.publish(self.cfg, self.manifests, self.readiness.status)
        saved_in = str(self.live.file) if self.live.file else None
        return {"route": name, "previous": previous, **describe.routes_of([route], self.manifests, self.live.changed_at)[name],
                "saved_in": saved_in}

    def apply_policy(self, name: str, policy: str, old: dict[str, float], split: dict[str, float]) -> None:
        """A policy's new split, as PATCH /routes applies it, and audited as made by the policy."""
        from .audit import AuditLog

        answer = self.change_route(name, {"split": split})
        AuditLog().write(client=f"policy:{policy}", route=name, before={"split": old},
                         after={"split": answer["split"]}, result={"status": 200})
        logger.info("route %s: the %s policy moved the split to %s", name, policy,
                    {v: round(w, 3) for v, w in answer["split"].items()})

    def describe_variants(self) -> list[dict]:
        self.readiness.refresh()
        return describe.variants(self.cfg, self.manifests, self.readiness.status, self.readiness.problems,
                                 self.dispatcher.transport, lambda v: self.readiness.variant(v)["replicas"],
                                 self.admission.held,
                                 lambda v: self.dispatcher.remote.describe(v) if v in self.dispatcher.remote else None,
                                 lambda v: self.versions.describe(v)["versions"])

    def describe_routes(self) -> dict:
        return describe.routes(self.cfg, self.manifests, self.live.changed_at, self.live.file)

