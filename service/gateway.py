"""The gateway: HTTP endpoints, input checks, routing, shadowing, answers.

The classify endpoints are Starlette routes mounted on the BentoML service rather than typed
`@bentoml.api` methods, because BentoML's multipart parsing decides the status of bad input itself
(500 for a text field where a file is expected, after fetching it as a URL) and reads any body size.
Here every failure has its status and message:
- 413: the body is above `server.max_body_mb` (checked on Content-Length and while streaming), or an
  image declares more than `server.max_pixels`;
- 408: the body did not arrive within `server.body_timeout_s`;
- 400: not multipart, missing/empty/garbage/truncated image, a text field where a file goes or the
  reverse, unknown fields, unknown variant or route (the message lists the valid ones), top_k out of
  range;
- 429 + Retry-After: more than `server.max_inflight` classify requests in the gateway at once, or
  more than `server.max_uploads` still receiving their bodies;
- 503 + Retry-After: the variant's worker is not ready, or its batcher refused the request because
  it could not meet `max_latency_ms` (BentoML's load shedding);
- 502: the worker failed in another way (after retries of dropped connections).
BentoML still serves /livez, /readyz (`__is_ready__` below), /metrics and /docs.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import time
import uuid
from dataclasses import replace
from typing import Any

import anyio.to_thread
import numpy as np
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse
from starlette.routing import Route

from . import metrics, route_state
from .coalesce import Coalescer
from .heap import freeze_startup_heap, watch_collector
from .inprocess import InProcessVariant
from .config import ConfigError, RouteConfig, ServingConfig, check_label_spaces, parse_route, unrouted
from .images import DecodeBudget, ImageError, open_image, to_rgb_array
from .routing import Assignment, Router, RoutingError, shown
from .shm import Arena, Lease
from .workers import combine_status

logger = logging.getLogger("effnet.gateway")

CLASSIFY_PATHS = ("/classify", "/classify_batch")
CLASSIFY_FIELDS = {"image", "variant", "route", "top_k"}
BATCH_FIELDS = {"images", "image", "variant", "route", "top_k"}
DEFAULT_TOP_K = 5
ADMIN_TOKEN_ENV = "EFFNET_ADMIN_TOKEN"  # when set, PATCH /routes/NAME needs "Authorization: Bearer <it>"
LOOPBACK = ("127.0.0.1", "::1")
WORKER_RETRIES = 2  # dropped connections between gateway and worker; inference is idempotent
MAX_SHADOW_INFLIGHT = 16  # mirrored calls in flight; beyond that shadowing is skipped, never queued
# Decoding a small image (a 28x28 PNG: ~0.1 ms) costs less than handing it to a thread, and the
# thread's GIL hand-offs stalled the event loop: the fashion route with compact chosen at 32 clients
# went from 219-255 to 253-298 req/s when decoded inline (benchmarks/serving.md, section of 2026-11-27 11:45-12:50).
# 224x224 is the ImageNet input (~1 ms for a JPEG); anything larger goes to a thread.
INLINE_DECODE_PIXELS = 256 * 256


class ClientError(Exception):
    """Answered with `status` and the message as {"error": ...}."""

    def __init__(self, message: str, status: int = 400, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


class LimitsMiddleware:
    """Body size, upload time and in-flight limits on the classify endpoints, before the app runs.

    Pure ASGI, so it can refuse on Content-Length without reading, and count bytes of chunked bodies.
    The whole body is received here before the request takes one of the `max_inflight` slots that
    bound the gateway's work: a client that uploads slowly (or never finishes) holds only an upload
    place, and is answered 408 when `body_timeout_s` has passed. NOTE: before, 70 connections that
    sent headers and stopped held every slot until BentoML's 60 s timeout, and every other client got
    429 meanwhile (2026-11-27).
    """

    def __init__(self, app: Any, max_body_bytes: int, max_inflight: int, retry_after_s: int,
                 body_timeout_s: float = 30.0, max_uploads: int = 256) -> None:
        self.app = app
        self.max_body = max_body_bytes
        self.max_inflight = max_inflight
        self.retry_after = str(retry_after_s)
        self.body_timeout = body_timeout_s
        self.max_uploads = max_uploads
        self.inflight = 0
        self.uploading = 0

    async def _refuse(self, send: Any, status: int, message: str, endpoint: str, headers: dict | None = None) -> None:
        rid = uuid.uuid4().hex
        metrics.REQUESTS.labels(endpoint, "none", "none", str(status)).inc()
        resp = JSONResponse({"error": message, "request_id": rid}, status_code=status,
                            headers={"X-Request-Id": rid, **(headers or {})})
        await resp({"type": "http"}, None, send)

    async def _receive_body(self, receive: Any) -> tuple[list[dict] | None, str | None]:
        """Every body message, or None and why not: "large", "slow", or "gone" (the client left)."""
        messages: list[dict] = []
        received = 0
        try:
            async with asyncio.timeout(self.body_timeout):  # one deadline for the whole body, no task per chunk
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        return None, "gone"
                    received += len(message.get("body", b""))
                    if received > self.max_body:
                        return None, "large"
                    messages.append(message)
                    if not message.get("more_body"):
                        return messages, None
        except TimeoutError:
            return None, "slow"

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in CLASSIFY_PATHS or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        endpoint = scope["path"].lstrip("/")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await self._refuse(send, 413, f"request body of {int(length):,} bytes is above the limit of "
                                      f"{self.max_body:,} bytes", endpoint)
        if self.inflight >= self.max_inflight or self.uploading >= self.max_uploads:
            busy = (f"{self.inflight} requests in flight" if self.inflight >= self.max_inflight
                    else f"{self.uploading} uploads in progress")
            return await self._refuse(send, 429, f"overloaded: {busy}; retry later",
                                      endpoint, {"Retry-After": self.retry_after})
        self.uploading += 1
        metrics.IN_GATEWAY.labels("uploading").inc()
        try:
            body, problem = await self._receive_body(receive)
        finally:
            self.uploading -= 1
            metrics.IN_GATEWAY.labels("uploading").dec()
        if problem == "large":
            return await self._refuse(send, 413, f"request body is above the limit of {self.max_body:,} bytes", endpoint)
        if problem == "slow":
            return await self._refuse(send, 408, f"the request body did not arrive within {self.body_timeout:g} s; "
                                      "send it at once, or a smaller image", endpoint)
        if problem == "gone":
            return None  # nobody to answer
        if self.inflight >= self.max_inflight:  # the slots may have filled while this body arrived
            return await self._refuse(send, 429, f"overloaded: {self.inflight} requests in flight; retry later",
                                      endpoint, {"Retry-After": self.retry_after})

        # The body is in; from now on the client's connection only says whether it went away. NOTE:
        # without watching it, the work of clients that had left still ran: 10 clients that sent a
        # /classify_batch of 32 lite0 images and hung up made the next live request wait 6-9 s instead
        # of 0.1 s (2026-11-27). Now the request is cancelled, and what it queued is never sent.
        gone = asyncio.Event()
        answered = False

        async def watch() -> None:
            # After the body, an ASGI server's receive() waits for the disconnect; uvicorn also reports
            # one once the answer is complete, which is no reason to cancel anything.
            if (await receive())["type"] == "http.disconnect" and not answered:
                gone.set()

        async def replay() -> Any:
            if body:
                return body.pop(0)
            await gone.wait()
            return {"type": "http.disconnect"}

        async def sending(message: dict) -> None:
            nonlocal answered
            if message["type"] == "http.response.body" and not message.get("more_body"):
                answered = True  # before the send: the watcher may wake while it completes
            await send(message)

        self.inflight += 1
        metrics.IN_GATEWAY.labels("processing").inc()
        handler = asyncio.ensure_future(self.app(scope, replay, sending))
        watcher = asyncio.ensure_future(watch())
        try:
            await asyncio.wait((handler, watcher), return_when=asyncio.FIRST_COMPLETED)
            if gone.is_set():  # the client went away before its answer: nobody will read it
                handler.cancel()
            try:
                await handler
            except asyncio.CancelledError:
                if not gone.is_set() or asyncio.current_task().cancelling():
                    raise
        finally:
            watcher.cancel()
            handler.cancel()  # a no-op once done; else (this middleware cancelled) it must not run on alone
            self.inflight -= 1
            metrics.IN_GATEWAY.labels("processing").dec()


_ERROR = {"description": "error", "content": {"application/json": {"schema": {
    "type": "object", "properties": {"error": {"type": "string"}, "request_id": {"type": "string"}}}}}}
_PREDICTION = {"type": "object", "properties": {
    "request_id": {"type": "string"}, "route": {"type": "string"}, "variant": {"type": "string"},
    "model": {"type": "string"}, "assignment": {"type": "string", "enum": ["explicit", "split", "default"]},
    "predictions": {"type": "array", "items": {"type": "object", "properties": {
        "label": {"type": "string"}, "index": {"type": "integer"}, "score": {"type": "number"}}}},
    "latency_ms": {"type": "number"}}}
_FIELDS = {"variant": {"type": "string", "description": "explicit variant (GET /variants)"},
           "route": {"type": "string", "description": "route (GET /routes); default: the default route"},
           "top_k": {"type": "integer", "minimum": 1, "default": DEFAULT_TOP_K}}
_ERRORS = {"400": _ERROR, "408": _ERROR, "413": _ERROR, "429": _ERROR, "503": _ERROR}
_CLIENT_ID = [{"name": "X-Client-Id", "in": "header", "required": False, "schema": {"type": "string"},
               "description": "sticky split key: one client, one variant while the weights stay the same"}]
OPENAPI_PATHS = {
    "/classify": {"post": {
        "tags": ["Service APIs"], "summary": "Classify one image", "parameters": _CLIENT_ID,
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["image"],
            "properties": {"image": {"type": "string", "format": "binary"}, **_FIELDS}}}}},
        "responses": {"200": {"description": "top-k predictions", "content": {"application/json": {"schema": _PREDICTION}}},
                      **_ERRORS}}},
    "/classify_batch": {"post": {
        "tags": ["Service APIs"], "summary": "Classify several images; a bad image fails only its item",
        "parameters": _CLIENT_ID,
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["images"],
            "properties": {"images": {"type": "array", "items": {"type": "string", "format": "binary"}}, **_FIELDS}}}}},
        "responses": {"200": {"description": "one result per image, in order", "content": {"application/json": {
            "schema": {"type": "object", "properties": {"request_id": {"type": "string"},
                                                        "results": {"type": "array", "items": _PREDICTION}}}}}},
                      **_ERRORS}}},
    "/variants": {"get": {"tags": ["Service APIs"], "summary": "Served variants: route, weight, device, params, MACs, offline top-1",
                          "responses": {"200": {"description": "variants"}}}},
    "/routes": {"get": {"tags": ["Service APIs"], "summary": "Routes, split weights and shadows",
                        "responses": {"200": {"description": "routes"}}}},
    "/routes/{name}": {"patch": {
        "tags": ["Service APIs"], "summary": "Change a route's split weights and/or shadow while serving "
        "(from this machine, or with $EFFNET_ADMIN_TOKEN as a Bearer token); a restart serves the file again",
        "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object", "properties": {
            "split": {"type": "object", "additionalProperties": {"type": "number"}},
            "shadow": {"type": ["object", "null"], "properties": {
                "variant": {"type": "string"}, "fraction": {"type": "number"}}}}}}}},
        "responses": {"200": {"description": "the route as changed, and as it was"}, "400": _ERROR, "401": _ERROR,
                      "403": _ERROR, "404": _ERROR}}},
}


class OpenAPIPathsMiddleware:
    """Adds the mounted classify routes to BentoML's OpenAPI document (`/docs.json`, shown at `/docs`).

    BentoML documents its typed `@bentoml.api` methods and mounted FastAPI apps only; ours are plain
    Starlette routes (see the module docstring for why), so their description is merged in here.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/docs.json":
            return await self.app(scope, receive, send)
        import json

        start, chunks = {}, []

        async def capture(message: Any) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            else:
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        body = b"".join(chunks)
        try:
            spec = json.loads(body)
            spec.setdefault("paths", {}).update(OPENAPI_PATHS)
            body = json.dumps(spec).encode()
        except ValueError:
            pass  # not JSON (an error page): pass it through unchanged
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": start.get("status", 200), "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _error(rid: str, status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "request_id": rid}, status_code=status,
                        headers={"X-Request-Id": rid, **(headers or {})})


def _text_field(form: Any, name: str) -> str | None:
    values = form.getlist(name)
    if not values:
        return None
    if len(values) > 1:
        raise ClientError(f"field {name!r} is given {len(values)} times; give it once")
    value = values[0]
    if isinstance(value, UploadFile):
        raise ClientError(f"field {name!r} must be a text value, not a file")
    value = value.strip()
    return value or None


QUERY_FIELDS = ("variant", "route", "top_k")


def _field(form: Any, query: Any, name: str) -> str | None:
    """A text field from the form or, as many clients send them, from the query string (?route=...).
    NOTE: the query string used to be ignored: `POST /classify?route=imagenet` with a photo answered
    200 from the default route's fashion model."""
    in_form = _text_field(form, name)
    if name not in query:
        return in_form
    in_query = _text_field(query, name)
    if in_query is None:  # ?route= with nothing after it says nothing
        return in_form
    if in_form is not None and in_query != in_form:
        raise ClientError(f"{name!r} is given twice, as {shown(in_query)} in the query string and as "
                          f"{shown(in_form)} in the form; give it once")
    return in_query


class GatewayLogic:
    """The gateway's state and request handling; `app.py` mixes it into the BentoML service class."""

    cfg: ServingConfig
    worker_attrs: dict[str, list[str]]  # variant -> the attributes holding its replicas' bentoml.depends proxies

    def __init__(self) -> None:
        import torch

        from store import CheckpointError, read_manifest

        # The gateway's torch work is resizing one decoded image at a time: intra-op threads would only
        # add OpenMP helpers that spin on the cores the workers' slots hand out.
        torch.set_num_threads(1)
        # store.resize_crop imports torchvision on first use (about 2 s): pay it here, not on a request.
        import torchvision.transforms.v2.functional  # noqa: F401

        watch_collector("effnet-gateway", "none")
        self.router = Router(self.cfg)
        self.manifests: dict[str, Any] = {}
        self.problems: dict[str, str] = {}  # variant -> why it cannot serve (from the manifest or worker)
        self.status: dict[str, dict] = {}  # variant -> worker status once ready
        self.ready = False
        self.checked_at = 0.0  # last readiness check made on a request's behalf
        self.shadow_tasks: set[asyncio.Task] = set()
        self.decoding = DecodeBudget(self.cfg.server.max_decoding_pixels)
        # variant -> its gateway-side batcher (service.coalesce), made on first use inside the event loop
        self.coalescers: dict[str, Coalescer] = {}
        # variant -> calls in flight to each of its worker replicas (the next call goes to the least busy)
        self.replica_calls: dict[str, list[int]] = {name: [0] * len(attrs) for name, attrs in self.worker_attrs.items()}
        # variant -> its shared-memory arena (service/shm.py), made at its first call; None: batches go in
        # the HTTP body (worker_transport: http, or shared memory failed for it)
        self.arenas: dict[str, Arena | None] = {}
        for name, v in self.cfg.variants.items():
            try:
                self.manifests[name], _ = read_manifest(v.model)
            except CheckpointError as e:
                self.problems[name] = f"variant {name!r}, checkpoint {v.model!r}: {e}"
                logger.error("effnet gateway: %s", self.problems[name])
        # Variants with `placement: gateway` run in this process (service/inprocess.py), loading in a
        # thread while the server already answers; the others are reached through their worker's proxy.
        self.local: dict[str, InProcessVariant] = {}
        for name, v in self.cfg.variants.items():
            if v.placement == "gateway":
                self.local[name] = InProcessVariant(v, self.cfg, torch.cuda.is_available())
        self.config_error = None
        self._init_route_changes()
        self._publish_splits(self.cfg.routes.values())
        try:
            check_label_spaces(self.cfg, {n: m.classes for n, m in self.manifests.items()})
        except ConfigError as e:
            self.config_error = f"configuration error in {self.cfg.source}: {e}"
            logger.error("effnet gateway: %s", self.config_error)

    def replicas(self, variant: str) -> list[Any]:
        """The proxies of a variant's worker processes (service.workers.worker_names)."""
        return [getattr(self, attr) for attr in self.worker_attrs[variant]]

    async def worker_status(self, variant: str) -> dict:
        """The variant's status, from each of its replicas (raises when one is not reachable)."""
        return combine_status([await w.to_async.status() for w in self.replicas(variant)])

    # readiness --------------------------------------------------------------------------------------

    async def __is_ready__(self) -> bool:
        """Ready once every worker has loaded and verified its checkpoint; else 503 with the reasons."""
        if self.ready:
            return True
        reasons = [self.config_error] if self.config_error else []
        for name in self.cfg.variants:
            try:
                st = self.local[name].status() if name in self.local else await self.worker_status(name)
            except Exception as e:
                reasons.append(self.problems.get(name) or f"variant {name!r}: worker not reachable yet ({type(e).__name__})")
                continue
            if not st.get("ready"):
                self.problems[name] = st.get("error") or self.problems.get(name) or f"variant {name!r}: not loaded"
                reasons.append(self.problems[name])
            else:
                self.status[name] = st
                self.problems.pop(name, None)  # e.g. "1 of 2 worker processes loaded" while it started
        if reasons:
            raise HTTPException(status_code=503, detail="not ready: " + "; ".join(reasons))
        self.ready = True
        self._publish_info()
        # Everything start-up built stays for the life of the process: out of the collector's full passes
        # with it (service/heap.py: 160-170 ms pauses of the whole gateway every 6-7 s under load otherwise).
        freeze_startup_heap("effnet-gateway", "none")
        return True

    def _publish_info(self) -> None:
        """effnet_variant_info, one series at 1 per variant; a series whose labels changed (a route
        change moved the variant into or out of a route) is set to 0."""
        labels = getattr(self, "info_labels", {})
        for name, v in self.cfg.variants.items():
            m, st = self.manifests[name], self.status[name]
            eng = st.get("engine") or {}
            now = (name, ",".join(self.cfg.routes_of(name)), v.model, str(m.params), str(m.macs),
                   str(m.metrics.get("top1", "")), str(m.resolution), st.get("device", ""),
                   eng.get("engine", v.engine), str(eng.get("precision", "")))
            if labels.get(name, now) != now:
                metrics.VARIANT_INFO.labels(*labels[name]).set(0)
            metrics.VARIANT_INFO.labels(*now).set(1)
            labels[name] = now
        self.info_labels = labels

    # inference --------------------------------------------------------------------------------------

    async def infer(self, variant: str, batch: np.ndarray) -> tuple[np.ndarray, float]:
        """Scores (N, K) for a uint8 batch, and the seconds it waited before its inference started.

        Requests that wait for the same variant together are sent as one call (service.coalesce)."""
        c = self.coalescers.get(variant)
        if c is None:
            v = self.cfg.variants[variant]
            # The coalescer sheds load for both placements (service/coalesce.py): behind it, a worker's
            # batcher sees at most `gateway_calls` calls and never a queue long enough to shed.
            call = self.call_local if variant in self.local else self.call_worker
            c = Coalescer(lambda b: call(variant, b), v.max_batch_size, v.gateway_calls,
                          max_wait_s=v.max_latency_ms / 1000, too_late=lambda: self._at_capacity(variant))
            self.coalescers[variant] = c
        return await c(batch)

    def check_capacity(self, variant: str, images: int) -> None:
        """Refuse (503) before decoding what the variant's queue would refuse after it anyway."""
        c = self.coalescers.get(variant)
        if c is not None and c.overloaded(images):
            raise self._at_capacity(variant)

    def _at_capacity(self, variant: str) -> ClientError:
        return ClientError(f"variant {variant!r} is at capacity; retry later", 503,
                           {"Retry-After": str(self.cfg.server.retry_after_s)})

    async def call_local(self, variant: str, batch: np.ndarray) -> tuple[np.ndarray, float]:
        """`call_worker` for a variant in this process: scores (N, K) and the seconds its inference took."""
        local = self.local[variant]
        if not local.loaded:  # failed, or still loading (in its thread, service/inprocess.py)
            raise ClientError(local.status()["error"], 503, {"Retry-After": str(self.cfg.server.retry_after_s)})
        try:
            out = await local.predict(batch)
        except Exception as e:  # an engine failure: the request is not at fault, and the message is ours
            logger.exception("variant %s: in-process inference failed", variant)
            raise ClientError(f"variant {variant!r}: inference failed ({type(e).__name__})", 502) from None
        return out[:, :-1], float(out[0, -1])

    def _lease(self, variant: str, batch: np.ndarray) -> Lease | None:
        """The batch written into the variant's shared-memory arena, or None: send it in the body."""
        if variant not in self.arenas:
            arena = None
            if self.cfg.server.worker_transport == "shared_memory":
                v = self.cfg.variants[variant]
                try:
                    # NOTE: two slots per call in flight: a slot whose call failed unanswered waits out the
                    # worker's timeout before reuse, and its call's successor must not fall back for that.
                    arena = Arena(variant, v.max_batch_size, batch.shape[1:], slots=2 * v.gateway_calls,
                                  quarantine_s=self.cfg.server.timeout_s + 5)
                except OSError as e:  # no memfd on this system, or no memory left for it
                    logger.warning("variant %s: batches go in the HTTP body, shared memory is not available: %s",
                                   variant, e)
            self.arenas[variant] = arena
        arena = self.arenas[variant]
        return arena.put(batch) if arena is not None else None

    def worker_transport(self, variant: str) -> str:
        """How the variant's batches reach it now: in_process, shared_memory or http."""
        if variant in self.local:
            return "in_process"
        if self.cfg.server.worker_transport == "http" or self.arenas.get(variant, True) is None:
            return "http"
        return "shared_memory"

    async def call_worker(self, variant: str, batch: np.ndarray) -> tuple[np.ndarray, float]:
        """One call to one of the variant's worker processes: scores (N, K) and the seconds its inference took."""
        import aiohttp
        import httpx
        from bentoml.exceptions import BentoMLException

        replicas, calls = self.replicas(variant), self.replica_calls[variant]
        failed: set[int] = set()
        lease, answered, attempt = self._lease(variant, batch), False, 0
        try:
            while True:
                # the replica with the fewest calls in flight, among those this call has not seen fail;
                # among equals, the first (a lone request always meets the same warm process)
                candidates = [k for k in range(len(calls)) if k not in failed] or list(range(len(calls)))
                i = min(candidates, key=calls.__getitem__)
                calls[i] += 1
                try:
                    if lease is not None:
                        out = await replicas[i].to_async.predict_shared(lease.refs)
                    else:
                        out = await replicas[i].to_async.predict(batch)
                    answered = True
                    metrics.WORKER_CALLS.labels(variant, "http" if lease is None else "shared_memory").inc()
                    break
                except (httpx.TimeoutException, TimeoutError):  # before the next clause: aiohttp's are both
                    raise ClientError(f"variant {variant!r} did not answer in time; retry later", 503,
                                      {"Retry-After": str(self.cfg.server.retry_after_s)}) from None
                except (httpx.TransportError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
                    # NOTE: a dropped connection. bentoml 1.4.31-1.4.40 close sessions under load (FACTS.md);
                    # 1.4.30's client between services is aiohttp, and a worker that stalled past its
                    # keep-alive closed pooled connections under the gateway ("Can not write request body",
                    # H200, benchmarks/gpu/README.md). Inference has no side effects: trying again is safe.
                    if attempt == WORKER_RETRIES:
                        raise ClientError(f"variant {variant!r}: worker connection failed ({type(e).__name__})", 502) from None
                    attempt += 1
                    failed.add(i)  # a process that is gone or restarting: try another one first
                    logger.warning("variant %s: retrying after %s", variant, type(e).__name__)
                except BentoMLException as e:
                    answered = True  # the worker answered: it no longer reads the slot
                    status = int(getattr(e, "error_code", 500))
                    if status == 404 and lease is not None:
                        # The worker cannot map the arena (another host or container): pixels in the body
                        # from now on, for this variant, and this call sent again so.
                        logger.warning("variant %s: batches go in the HTTP body, its worker cannot read "
                                       "shared memory: %s", variant, e)
                        self.arenas[variant] = None
                        lease.release(True)
                        lease = None
                        continue
                    if status in (429, 503):
                        raise self._at_capacity(variant) from None
                    raise ClientError(f"variant {variant!r}: worker failed ({status})", 502) from None
                finally:
                    calls[i] -= 1
        finally:
            if lease is not None:
                lease.release(answered)
        out = np.asarray(out)
        return out[:, :-1], float(out[0, -1])

    async def prepare(self, data: bytes, variant: str) -> np.ndarray:
        """Bytes -> uint8 (1, 3, R, R) at the variant's resolution.

        The header is read on the event loop (cheap, and it enforces the pixel limit). Images of at
        most INLINE_DECODE_PIXELS are decoded there too; larger ones in a thread, so a big photo
        never stalls the loop, and only while the decoding budget (`server.max_decoding_pixels`) has
        room for their declared pixels, so that many large images at once cannot exhaust the memory.
        """
        img = open_image(data, max_pixels=self.cfg.server.max_pixels)
        w, h = img.size
        if w * h <= INLINE_DECODE_PIXELS:
            return self._pixels(img, variant, data)
        async with self.decoding.take(w * h):
            return await anyio.to_thread.run_sync(self._pixels, img, variant, data)

    def _pixels(self, img, variant: str, data: bytes | None = None) -> np.ndarray:
        import torch

        from store import resize_crop

        m = self.manifests[variant]
        rgb = to_rgb_array(img, min_side=m.resize or m.resolution, data=data)
        return resize_crop(torch.from_numpy(rgb), m).numpy()

    def predictions(self, scores: np.ndarray, variant: str, top_k: int) -> list[dict]:
        classes = self.manifests[variant].classes
        idx = np.argsort(-scores, kind="stable")[:top_k]
        return [{"label": classes[i], "index": int(i), "score": round(float(scores[i]), 6)} for i in idx]

    def shadow(self, a: Assignment, batch: np.ndarray, primary_top1: list[int]) -> None:
        """Mirror to the shadow variant in the background; only agreement is recorded."""
        if len(self.shadow_tasks) >= MAX_SHADOW_INFLIGHT:
            metrics.SHADOW.labels(a.route, a.shadow, a.variant, "skipped").inc(len(primary_top1))
            return

        async def run() -> None:
            try:
                m_p, m_s = self.manifests[a.variant], self.manifests[a.shadow]
                if m_s.resolution != m_p.resolution:
                    import torch

                    from store import resize_crop

                    b = resize_crop(torch.from_numpy(batch), m_s).numpy()
                else:
                    b = batch
                scores, _ = await self.infer(a.shadow, b)
                for top, row in zip(primary_top1, scores):
                    result = "agree" if int(np.argmax(row)) == top else "disagree"
                    metrics.SHADOW.labels(a.route, a.shadow, a.variant, result).inc()
            except Exception as e:
                logger.warning("shadow %s failed: %s", a.shadow, e)
                metrics.SHADOW.labels(a.route, a.shadow, a.variant, "error").inc(len(primary_top1))

        task = asyncio.get_running_loop().create_task(run())
        self.shadow_tasks.add(task)
        task.add_done_callback(self.shadow_tasks.discard)

    # request handling -------------------------------------------------------------------------------

    async def _parse(self, request: Request, allowed: set[str]) -> tuple[Any, Assignment, int]:
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise ClientError("send multipart/form-data with the image as a file field "
                              f"(got content type {ctype or 'none'!r}), e.g. curl -F image=@photo.jpg")
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise ClientError(f"request bodies are not decompressed here (Content-Encoding: {shown(encoding)}); "
                              "send the multipart body as it is: images are compressed already", 415)
        boundary = re.search(r'boundary="?([^";]+)"?', ctype)
        if boundary:
            # NOTE: the multipart parser drops a part that never ends, so a cut-off upload read as
            # "missing file field 'image'". The body is already in memory (LimitsMiddleware); Starlette
            # parses the form from this same copy.
            body = await request.body()
            if b"--" + boundary.group(1).encode() + b"--" not in body[-(len(boundary.group(1)) + 1024):]:
                raise ClientError("the multipart body is incomplete: it does not end with its closing boundary "
                                  f"({len(body):,} bytes arrived; was the upload interrupted?)")
        try:
            form = await request.form(max_files=self.cfg.server.max_batch_images + 1, max_fields=16)
        except Exception as e:
            detail = str(getattr(e, "detail", e))
            if detail.startswith("Too many files"):  # Starlette counts the +1 above, which only confuses
                detail = (f"too many files: at most one for /classify and {self.cfg.server.max_batch_images} "
                          "for /classify_batch (server.max_batch_images)")
            raise ClientError(f"the body is not valid multipart/form-data: {detail}") from None
        unknown = set(form.keys()) - allowed
        if unknown:
            raise ClientError(f"unknown field(s) {shown(sorted(unknown), 200)}; fields: {', '.join(sorted(allowed))}")
        query = request.query_params
        unknown = set(query.keys()) - set(QUERY_FIELDS)
        if unknown:  # refused like unknown fields
            raise ClientError(f"unknown query parameter(s) {shown(sorted(unknown), 200)}; "
                              f"parameters: {', '.join(QUERY_FIELDS)} (or send them as form fields)")
        variant, route, top_k_raw = (_field(form, query, name) for name in QUERY_FIELDS)
        try:
            a = self.router.assign(route, variant, request.headers.get("x-client-id") or None)
        except RoutingError as e:
            raise ClientError(str(e)) from None
        if not self.ready and time.monotonic() - self.checked_at > 1.0:
            # learn the workers' problems (a bad checkpoint) before calling them, at most once a second
            self.checked_at = time.monotonic()
            try:
                await self.__is_ready__()
            except HTTPException:
                pass
        if a.variant in self.problems or a.variant not in self.manifests:
            raise ClientError(f"variant {a.variant!r} is not ready: {self.problems.get(a.variant, 'loading')}",
                              503, {"Retry-After": str(self.cfg.server.retry_after_s)})
        k_max = min(self.cfg.server.max_top_k, self.manifests[a.variant].num_classes)
        if top_k_raw is None:
            return form, a, min(DEFAULT_TOP_K, k_max)
        # ASCII digits only: int() would also take "1_0" and other scripts' digits, which no client means.
        if not re.fullmatch(r"\s*\+?[0-9]{1,30}\s*", top_k_raw, flags=re.ASCII):
            raise ClientError(f"top_k must be an integer from 1 to {k_max}, got {shown(top_k_raw)}")
        top_k = int(top_k_raw)
        if not 1 <= top_k <= k_max:
            raise ClientError(f"top_k must be from 1 to {k_max} (variant {a.variant!r} has "
                              f"{self.manifests[a.variant].num_classes} classes), got {top_k}")
        return form, a, top_k

    def _answer(self, rid: str, a: Assignment, scores: np.ndarray, top_k: int, t0: float) -> dict:
        preds = self.predictions(scores, a.variant, top_k)
        metrics.TOP1_SCORE.labels(a.route, a.variant).observe(preds[0]["score"])
        return {"request_id": rid, "route": a.route, "variant": a.variant, "model": self.cfg.variants[a.variant].model,
                "assignment": a.how, "predictions": preds, "latency_ms": round((time.perf_counter() - t0) * 1000, 2)}

    def _refusal(self, rid: str, e: Exception) -> tuple[int, JSONResponse]:
        """The status and error answer for a client's mistake (or a not-ready variant)."""
        return e.status, _error(rid, e.status, str(e), getattr(e, "headers", None))

    @staticmethod
    def _fault(rid: str, e: Exception) -> tuple[int, JSONResponse]:
        """A 500 answer for a fault of ours. Left to the ASGI server, the exception would also close the
        client's keep-alive connection (the H200 session's load client saw "connection reset") and
        skip the request metrics."""
        logger.error("request %s failed", rid, exc_info=e)
        return 500, _error(rid, 500, f"internal error ({type(e).__name__}); the server log names request {rid}")

    async def classify(self, request: Request) -> JSONResponse:
        t0, rid = time.perf_counter(), uuid.uuid4().hex
        route, variant = "none", "none"
        try:
            form, a, top_k = await self._parse(request, CLASSIFY_FIELDS)
            route, variant = a.route, a.variant
            files = form.getlist("image")
            if not files:
                raise ClientError("missing file field 'image' (e.g. curl -F image=@photo.jpg)")
            if len(files) > 1:
                raise ClientError(f"/classify takes one image, got {len(files)}; use /classify_batch for several")
            if not isinstance(files[0], UploadFile):
                raise ClientError("field 'image' must be a file (a multipart part with a filename), not a text value")
            self.check_capacity(a.variant, 1)
            data = await files[0].read()
            batch = await self.prepare(data, a.variant)
            scores, wait = await self.infer(a.variant, batch)
            metrics.QUEUE_WAIT.labels(a.route, a.variant).observe(wait)
            metrics.ASSIGNMENTS.labels(a.route, a.variant, a.how).inc()
            body = self._answer(rid, a, scores[0], top_k, t0)
            if a.shadow:
                self.shadow(a, batch, [body["predictions"][0]["index"]])
            status, resp = 200, JSONResponse(body, headers={"X-Request-Id": rid})
        except (ClientError, ImageError) as e:
            status, resp = self._refusal(rid, e)
        except Exception as e:  # noqa: BLE001 - our fault: answer and count it; uvicorn would drop the connection
            status, resp = self._fault(rid, e)
        except asyncio.CancelledError:  # the client went away (LimitsMiddleware): nginx's 499
            metrics.REQUESTS.labels("classify", route, variant, "499").inc()
            raise
        metrics.REQUESTS.labels("classify", route, variant, str(status)).inc()
        metrics.E2E_LATENCY.labels("classify", route, variant).observe(time.perf_counter() - t0)
        return resp

    async def classify_batch(self, request: Request) -> JSONResponse:
        t0, rid = time.perf_counter(), uuid.uuid4().hex
        route, variant = "none", "none"
        try:
            form, a, top_k = await self._parse(request, BATCH_FIELDS)
            route, variant = a.route, a.variant
            files = form.getlist("images") + form.getlist("image")
            if not files:
                raise ClientError("missing file field 'images' (e.g. curl -F images=@a.jpg -F images=@b.png)")
            if len(files) > self.cfg.server.max_batch_images:
                raise ClientError(f"{len(files)} images is above the limit of {self.cfg.server.max_batch_images} per request")
            self.check_capacity(a.variant, len(files))
            results: list[dict | None] = [None] * len(files)
            good: list[tuple[int, np.ndarray]] = []
            for i, f in enumerate(files):
                name = getattr(f, "filename", None)
                try:
                    if not isinstance(f, UploadFile):
                        raise ImageError("this item is a text value, not a file")
                    good.append((i, await self.prepare(await f.read(), a.variant)))
                except ImageError as e:
                    results[i] = {"index": i, "filename": name, "status": e.status, "error": str(e)}
                    metrics.REQUESTS.labels("classify_batch", route, variant, str(e.status)).inc()
            if good:
                batch = np.concatenate([b for _, b in good])
                scores, wait = await self.infer(a.variant, batch)
                metrics.QUEUE_WAIT.labels(a.route, a.variant).observe(wait)
                for (i, _), row in zip(good, scores):
                    item = self._answer(f"{rid}-{i}", a, row, top_k, t0)
                    results[i] = {"index": i, "filename": getattr(files[i], "filename", None), "status": 200, **item}
                    metrics.ASSIGNMENTS.labels(a.route, a.variant, a.how).inc()
                    metrics.REQUESTS.labels("classify_batch", route, variant, "200").inc()
                if a.shadow:
                    self.shadow(a, batch, [results[i]["predictions"][0]["index"] for i, _ in good])
            body = {"request_id": rid, "route": a.route, "variant": a.variant, "assignment": a.how,
                    "results": results, "latency_ms": round((time.perf_counter() - t0) * 1000, 2)}
            resp = JSONResponse(body, headers={"X-Request-Id": rid})
        except (ClientError, ImageError) as e:
            status, resp = self._refusal(rid, e)
            metrics.REQUESTS.labels("classify_batch", route, variant, str(status)).inc()
        except Exception as e:  # noqa: BLE001 - as in classify
            status, resp = self._fault(rid, e)
            metrics.REQUESTS.labels("classify_batch", route, variant, str(status)).inc()
        except asyncio.CancelledError:
            metrics.REQUESTS.labels("classify_batch", route, variant, "499").inc()
            raise
        metrics.E2E_LATENCY.labels("classify_batch", route, variant).observe(time.perf_counter() - t0)
        return resp

    # live route changes -----------------------------------------------------------------------------

    def _publish_splits(self, routes) -> None:
        for r in routes:
            for v in self.cfg.variants:
                metrics.SPLIT_WEIGHT.labels(r.name, v).set(r.split.get(v, 0.0))

    def _with_route(self, name: str, raw: Any) -> tuple[RouteConfig, ServingConfig]:
        """The configuration with route `name` replaced by `raw` ({"split", "shadow"}), checked as the
        configuration file is; raises ConfigError."""
        route = parse_route(name, raw, self.cfg.variants, where=name)
        routes = {**self.cfg.routes, name: route}
        left = unrouted(self.cfg.variants, routes)
        if left:
            raise ConfigError(f"variant(s) {left} would be in no route; keep them in a split or a shadow")
        new = replace(self.cfg, routes=routes)
        check_label_spaces(new, {n: m.classes for n, m in self.manifests.items()})
        return route, new

    def _init_route_changes(self) -> None:
        """Serve the live changes saved before the last restart, where the file has not been edited since."""
        self.file_routes: dict[str, RouteConfig] = dict(self.cfg.routes)  # as the configuration file has them
        self.changed_at: dict[str, str] = {}  # route -> when a live change made it differ from the file
        self.saved_routes: dict[str, dict] = {}
        persist = self.cfg.server.route_changes == "persist" and os.path.isfile(self.cfg.source)
        self.route_changes_file = route_state.state_path(self.cfg.source) if persist else None
        if not self.route_changes_file:
            return
        saved = route_state.load(self.route_changes_file)
        kept = {}
        for name, entry in saved.items():
            when = entry.get("changed_at", "?")
            if name not in self.file_routes:
                logger.warning("route %s: the change saved at %s is dropped: the configuration has no such route "
                               "any more", name, when)
                continue
            if not route_state.same_route(entry["base"], route_state.route_dict(self.file_routes[name])):
                logger.warning("route %s: the change saved at %s is dropped: the route has been edited in %s since, "
                               "and the file wins", name, when, self.cfg.source)
                continue
            try:
                route, self.cfg = self._with_route(name, entry["route"])
            except (ConfigError, TypeError, ValueError, AttributeError) as e:  # also a hand-edited file
                logger.warning("route %s: the change saved at %s is dropped: %s", name, when, e)
                continue
            self.router.cfg = self.cfg
            kept[name], self.changed_at[name] = entry, when
            logger.warning("route %s: serving the change made at %s (split %s, shadow %s), saved in %s, instead of "
                           "the file's; `effnet serve --reset-routes` serves the file's", name, when, route.split,
                           route.shadow, self.route_changes_file)
        if kept != saved:
            try:
                route_state.save(self.route_changes_file, kept, self.cfg.source)
            except OSError as e:
                logger.error("cannot rewrite %s: %s", self.route_changes_file, e)
        self.saved_routes = kept

    def _save_route_change(self, name: str, route: RouteConfig, when: str) -> None:
        """Record the change before it takes effect; a change that restores the file's route is forgotten."""
        if not self.route_changes_file:
            return
        entries, base = dict(self.saved_routes), route_state.route_dict(self.file_routes[name])
        if route_state.same_route(route_state.route_dict(route), base):
            entries.pop(name, None)
        else:
            entries[name] = {"base": base, "route": route_state.route_dict(route), "changed_at": when}
        try:
            route_state.save(self.route_changes_file, entries, self.cfg.source)
        except OSError as e:
            raise ClientError(f"route not changed: the change could not be saved to {self.route_changes_file} ({e}); "
                              "fix that, or set server.route_changes: memory", 500) from None
        self.saved_routes = entries

    def change_route(self, name: str, change: Any) -> dict:
        """Apply {"split": ..., "shadow": ...} (either or both; "shadow": null removes it) to route `name`.

        Checked as the configuration file is, plus what only a running server knows: every variant
        of the route must be loaded and share the route's classes, and no served variant may be left
        in no route. Raises ClientError (404 for an unknown route, else 400) and changes nothing then.
        With server.route_changes: persist (the default) the change is saved first (service/route_state.py)
        and a restart serves it again; with memory, a restart serves the configuration file's routes.
        """
        if name not in self.cfg.routes:
            raise ClientError(f"unknown route {shown(name)}; routes: {', '.join(self.cfg.routes)}", 404)
        if not isinstance(change, dict) or not change or set(change) - {"split", "shadow"}:
            raise ClientError('send a JSON object with "split" (variant -> weight) and/or "shadow" '
                              '({"variant": ..., "fraction": ...} or null), e.g. {"split": {"b0": 0.9, "mec": 0.1}}')
        old = self.cfg.routes[name]
        raw = {"split": change.get("split", old.split),
               "shadow": change["shadow"] if "shadow" in change else (
                   {"variant": old.shadow.variant, "fraction": old.shadow.fraction} if old.shadow else None)}
        try:
            route, new = self._with_route(name, raw)
        except ConfigError as e:
            raise ClientError(f"route not changed: {e}") from None
        for v in route.variants:
            if v in self.problems or v not in self.manifests:
                raise ClientError(f"route not changed: variant {v!r} is not ready: {self.problems.get(v, 'loading')}")
        previous = self.describe_routes_of([old])[name]
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._save_route_change(name, route, when)
        self.cfg = self.router.cfg = new
        if route_state.same_route(route_state.route_dict(route), route_state.route_dict(self.file_routes[name])):
            self.changed_at.pop(name, None)
        else:
            self.changed_at[name] = when
        self._publish_splits([route])
        if self.ready:
            self._publish_info()
        metrics.ROUTE_CHANGES.labels(name).inc()
        logger.warning("route %s changed: split %s -> %s, shadow %s -> %s (%s)", name, old.split, route.split,
                       old.shadow, route.shadow, f"saved in {self.route_changes_file}" if self.route_changes_file
                       else "until the next restart: server.route_changes is memory")
        saved_in = str(self.route_changes_file) if self.route_changes_file else None
        return {"route": name, "previous": previous, **self.describe_routes_of([route])[name], "saved_in": saved_in}

    # descriptions -----------------------------------------------------------------------------------

    def describe_variants(self) -> list[dict]:
        rows = []
        for name, v in self.cfg.variants.items():
            m, st = self.manifests.get(name), self.status.get(name, {})
            routes = self.cfg.routes_of(name)
            rows.append({
                "variant": name, "model": v.model, "routes": routes,
                "weights": {r: self.cfg.routes[r].split.get(name, 0.0) for r in routes},
                "shadow_in": [r for r in routes if (s := self.cfg.routes[r].shadow) and s.variant == name],
                "placement": v.placement,  # worker: its own processes; gateway: in the gateway's (no HTTP hop)
                # how its batches reach it: shared_memory (service/shm.py), http (in the call's body), in_process
                "worker_transport": self.worker_transport(name),
                "device": st.get("device"), "engine": (st.get("engine") or {}).get("engine", v.engine),
                # which engine and precision serve and why: auto's timings, engines refused and their
                # reasons, the verification figures against eager PyTorch (engines.Engine.describe)
                "precision": (st.get("engine") or {}).get("precision"),
                "engine_reason": (st.get("engine") or {}).get("reason"),
                "engine_refused": (st.get("engine") or {}).get("refused"),
                "engine_timings_ms": (st.get("engine") or {}).get("timings_ms"),
                "engine_verification": (st.get("engine") or {}).get("verification"),
                # A CPU batch runs on `threads` when the machine is idle, else on one (service.cpu_slots),
                # each with its own engine: {"1": ..., "2": ...}.
                "engines_by_threads": st.get("engines_by_threads"),
                # worker processes (or in-gateway streams) running, and how many have loaded their engines
                "threads": st.get("threads"), "workers": st.get("workers", v.workers),
                "workers_loaded": st.get("workers_loaded", 0), "calls_in_flight": v.gateway_calls,
                "max_batch_size": v.max_batch_size, "max_latency_ms": v.max_latency_ms,
                "architecture": m.variant if m else None, "dataset": m.dataset if m else None,
                "resolution": m.resolution if m else None, "num_classes": m.num_classes if m else None,
                "params": m.params if m else None, "macs": m.macs if m else None,
                "offline_top1": m.metrics.get("top1") if m else None,
                "ready": name in self.status and name not in self.problems, "problem": self.problems.get(name),
            })
        return rows

    def describe_routes_of(self, routes) -> dict:
        return {
            r.name: {"split": r.split, "variants": r.variants,
                     "shadow": {"variant": r.shadow.variant, "fraction": r.shadow.fraction} if r.shadow else None,
                     "num_classes": self.manifests[r.variants[0]].num_classes if r.variants[0] in self.manifests else None,
                     # when a live change made the route differ from the configuration file (null: as the file)
                     "changed_at": self.changed_at.get(r.name)}
            for r in routes
        }

    def describe_routes(self) -> dict:
        return {"default_route": self.cfg.default_route, "routes": self.describe_routes_of(self.cfg.routes.values()),
                "config": self.cfg.source, "route_changes": self.cfg.server.route_changes,
                "route_changes_file": str(self.route_changes_file) if self.route_changes_file else None}


def _current() -> GatewayLogic:
    import bentoml

    return bentoml.get_current_service()


async def _classify(request: Request) -> JSONResponse:
    return await _current().classify(request)


async def _classify_batch(request: Request) -> JSONResponse:
    return await _current().classify_batch(request)


async def _variants(request: Request) -> JSONResponse:
    return JSONResponse({"variants": _current().describe_variants()})


async def _routes(request: Request) -> JSONResponse:
    return JSONResponse(_current().describe_routes())


async def _assignment(request: Request) -> JSONResponse:
    """Which variant a client id gets in a route, without classifying anything: what an A/B analysis
    joins its outcomes on. The same hash as /classify, so the answer holds while the weights do."""
    gw, rid = _current(), uuid.uuid4().hex
    client = request.headers.get("x-client-id") or request.query_params.get("client_id")
    unknown = set(request.query_params) - {"route", "client_id"}
    if unknown:
        return _error(rid, 400, f"unknown query parameter(s) {sorted(unknown)}; parameters: client_id, route")
    if not client:
        return _error(rid, 400, "send the client id as the X-Client-Id header or ?client_id=: without one, "
                                "each request is assigned at random")
    try:
        a = gw.router.assign(request.query_params.get("route"), None, client)
    except RoutingError as e:
        return _error(rid, 400, str(e))
    return JSONResponse({"client_id": client, "route": a.route, "variant": a.variant,
                         "model": gw.cfg.variants[a.variant].model, "assignment": a.how,
                         "weights": gw.cfg.routes[a.route].split})


def admin_refusal(client_host: str | None, authorization: str | None, token: str | None,
                  proxied: bool = False) -> tuple[int, str] | None:
    """Who may change routes: with a token ($EFFNET_ADMIN_TOKEN), whoever sends it; without one, only
    clients on this machine (the server binds 127.0.0.1 by default, and `--host 0.0.0.0` must not
    open traffic control to the network). `proxied`: the request carries forwarding headers, so a
    reverse proxy on this machine passed it on from elsewhere: not local, whatever its address."""
    if token:
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            return 401, f"send the header 'Authorization: Bearer <token>' with the server's ${ADMIN_TOKEN_ENV}"
        return None
    if client_host not in LOOPBACK or proxied:
        return 403, (f"routes can be changed from the server's own machine only; set ${ADMIN_TOKEN_ENV} on the "
                     "server to allow others that send it")
    return None


async def _change_route(request: Request) -> JSONResponse:
    gw, rid = _current(), uuid.uuid4().hex
    proxied = any(h in request.headers for h in ("forwarded", "x-forwarded-for", "x-real-ip"))
    refused = admin_refusal(request.client.host if request.client else None,
                            request.headers.get("authorization"), os.environ.get(ADMIN_TOKEN_ENV), proxied)
    if refused:
        return _error(rid, *refused)
    body = await request.body()
    if len(body) > 64 * 1024:
        return _error(rid, 413, "a route change is a small JSON object; this body is above 64 kB")
    try:
        change = json.loads(body or b"null")
    except ValueError as e:
        return _error(rid, 400, f"the body is not JSON: {e}")
    try:
        return JSONResponse(gw.change_route(request.path_params["name"], change), headers={"X-Request-Id": rid})
    except ClientError as e:
        return _error(rid, e.status, str(e))


async def _method_not_allowed(request: Request, exc: Exception) -> JSONResponse:
    """Our JSON error shape for a known path asked with the wrong method (Starlette's own is plain text)."""
    # Starlette builds Allow from a set: "GET, HEAD" or "HEAD, GET" from one run to the next. Sorted here.
    listed = (getattr(exc, "headers", None) or {}).get("Allow", "")
    allow = ", ".join(sorted(m.strip() for m in listed.split(",") if m.strip()))
    return _error(uuid.uuid4().hex, 405, f"{request.method} is not allowed on {request.url.path}; use {allow}",
                  {"Allow": allow})


async def _docs(request: Request) -> RedirectResponse:
    """BentoML 1.4 shows its Swagger UI at `/` (the document at `/docs.json`); `/docs`, where FastAPI,
    BentoML's older releases and the serving design put it, answered 404."""
    return RedirectResponse("/", status_code=307)


http_app = Starlette(exception_handlers={405: _method_not_allowed}, routes=[
    Route("/docs", _docs, methods=["GET"]),
    Route("/classify", _classify, methods=["POST"]),
    Route("/classify_batch", _classify_batch, methods=["POST"]),
    Route("/variants", _variants, methods=["GET"]),
    Route("/routes", _routes, methods=["GET"]),
    Route("/routes/{name}", _change_route, methods=["PATCH"]),
    Route("/assignment", _assignment, methods=["GET"]),
])
