"""What `bentoml serve service.worker_app:Worker` serves: one variant's worker alone (`effnet worker`).

A gateway whose variant says `workers_at` (service/worker_addresses.py) starts no worker for it and
calls these instead, on this host or another: the same worker service that the gateway starts for
its other variants (service.workers.make_worker), with the same drain on SIGTERM and the same logs.
The variant comes from `$EFFNET_WORKER_VARIANT`, and the checkpoint from the configuration or
`$EFFNET_WORKER_MODEL` (a version of the variant that the gateway loads while serving).

The calls carry BentoML's own wire format between its services (pickled NumPy arrays, buffers out of
band), which a worker must accept only from its gateway: where `$EFFNET_WORKER_TOKEN` is set, a call
without it is refused 401 before its body is read (`WorkerTokenMiddleware`); the probes stay open.
"""
from __future__ import annotations

import hmac
import os
from dataclasses import replace
from typing import Any

from .config import ServingConfig, load_config
from .errors import error_response, request_id

VARIANT_ENV = "EFFNET_WORKER_VARIANT"
MODEL_ENV = "EFFNET_WORKER_MODEL"
TOKEN_ENV = "EFFNET_WORKER_TOKEN"
OPEN_PATHS = frozenset({"/readyz", "/livez", "/healthz", "/metrics"})  # probes and scraping need no token


def worker_token() -> str | None:
    """The shared secret between a gateway and its workers elsewhere, or None (calls are not checked)."""
    return os.environ.get(TOKEN_ENV) or None


class WorkerTokenMiddleware:
    """Refuses (401) a call that does not carry the worker token as `Authorization: Bearer TOKEN`."""

    def __init__(self, app: Any, token: str) -> None:
        self.app, self.expected = app, f"Bearer {token}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or ()).get(b"authorization", b"")
        if not hmac.compare_digest(given, self.expected):
            return await error_response(request_id(), 401, "this worker answers its gateway only: the worker "
                                        "token is missing or wrong")(scope, receive, send)
        return await self.app(scope, receive, send)


def with_worker_middleware(svc: Any, cfg: ServingConfig, token: str | None = None) -> Any:
    """A worker service with what every worker has: its log lines, its drain on SIGTERM, and (where a token
    is given) the token check."""
    from .drain import DrainMiddleware
    from .request_log import RequestLogMiddleware

    svc.add_asgi_middleware(RequestLogMiddleware, log_format=cfg.server.log_format, ids=False)
    # A worker serves on after SIGTERM until its calls are done (service/drain.py).
    svc.add_asgi_middleware(DrainMiddleware, role="worker", grace_s=cfg.server.drain_grace_s,
                            retry_after_s=cfg.server.retry_after_s)
    if token:
        svc.add_asgi_middleware(WorkerTokenMiddleware, token=token)
    return svc


def gpu_present() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def build_worker(cfg: ServingConfig, variant: str, model: str | None = None) -> Any:
    """The worker service of `variant` alone, serving `model` (a store tag) instead of the configured one."""
    from .config import ConfigError
    from .workers import make_worker, service_name

    if variant not in cfg.variants:
        raise ConfigError(f"{VARIANT_ENV}={variant!r}: not a variant of {cfg.source}; variants: {sorted(cfg.variants)}")
    v = cfg.variants[variant]
    v = replace(v, model=model or v.model, workers=1, workers_at=(), placement="worker")
    svc = make_worker(v, cfg, gpu_present(), service_name(variant))
    return with_worker_middleware(svc, cfg, worker_token())


def __getattr__(name: str) -> Any:
    # Built on first access, so that importing this module (the gateway imports its middleware) builds
    # nothing; `bentoml serve service.worker_app:Worker` asks for `Worker`.
    if name == "Worker":
        variant = os.environ.get(VARIANT_ENV)
        if not variant:
            raise RuntimeError(f"set {VARIANT_ENV} to the variant to serve (effnet worker VARIANT does)")
        worker = build_worker(load_config(), variant, os.environ.get(MODEL_ENV) or None)
        globals()["Worker"] = worker
        return worker
    raise AttributeError(name)
