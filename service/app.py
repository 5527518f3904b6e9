"""What `bentoml serve service.app:Gateway` imports: the services, built from the configuration.

The configuration file is `$EFFNET_SERVE_CONFIG` (set by `effnet serve --config`), else
`service/config.yaml`. Every process of the server (gateway and workers) imports this module and
reads the same file, so all of them build the same worker classes with the same names.
"""
from __future__ import annotations

import bentoml

from .config import load_config, tracing_options
from .connections import install as install_connection_limits
from .drain import DrainMiddleware
from .endpoints import ENDPOINTS, http_app
from .gateway import GatewayService
from .http_limits import LimitsMiddleware
from .key_guard import KeysMiddleware
from .keys import keys_file
from .openapi import OpenAPIMiddleware, paths
from .request_log import RequestLogMiddleware
from .worker_app import gpu_present, with_worker_middleware
from .workers import make_worker, make_workers, service_name


def build_gateway(cfg):
    """The gateway service class, with one `bentoml.depends` per worker process (service.workers)."""
    gpu = gpu_present()
    # Variants placed in the gateway (service/inprocess.py) have no worker service.
    # Variants whose workers run elsewhere (`workers_at`) are called at their addresses.
    remote = {name: v for name, v in cfg.variants.items() if v.placement == "worker" and not v.workers_at}
    attrs, worker_attrs = {}, {}
    for name, v in remote.items():
        worker_attrs[name] = []
        for i, svc in enumerate(make_workers(v, cfg, gpu), 1):
            with_worker_middleware(svc, cfg)  # its logs, and its drain after the gateway's (service/drain.py)
            attr = f"w_{name.replace('-', '_')}_{i}"
            attrs[attr] = bentoml.depends(svc)
            worker_attrs[name].append(attr)
    # A variant whose workers run elsewhere needs only its worker's class, for the shape of its API.
    remote_services = {name: make_worker(v, cfg, gpu, service_name(name))
                       for name, v in cfg.variants.items() if v.placement == "worker" and v.workers_at}
    namespace = {
        **attrs,
        "cfg": cfg,
        "worker_attrs": worker_attrs,
        "remote_services": remote_services,
        "__doc__": "Classify images with the EfficientNet variants of the serving configuration "
                   "(POST /classify, /classify_batch; GET /variants, /routes).",
    }
    cls = type("Gateway", (GatewayService,), namespace)
    # A GPU variant placed in the gateway needs the gateway to be given a GPU by BentoML's allocator
    # (CUDA_VISIBLE_DEVICES), as its worker would have been, rather than share whatever it sees.
    local_gpu = max((v.gpu for v in cfg.variants.values() if v.placement == "gateway"), default=0)
    extra = {"resources": {"gpu": local_gpu}} if gpu and local_gpu > 0 else {}
    svc = bentoml.service(
        **extra,
        name="effnet-gateway",
        # Our own in-flight limit answers 429 with Retry-After (BentoML's max_concurrency has none);
        # the timeout is a backstop behind it and the workers' max_latency_ms.
        traffic={"timeout": cfg.server.timeout_s},
        tracing=tracing_options(cfg.server),
        workers=1,
        # /readyz is the gateway's own health marks (service/readiness.py); BentoML's probe of every
        # dependency would wait up to 5 s on a worker that is gone
        runner_probe={"enabled": False, "timeout": 1, "period": 10},
    )(bentoml.asgi_app(http_app, path="/")(cls))
    # Outermost: the request's id, on the answer and every log line about it (service/request_log.py).
    svc.add_asgi_middleware(RequestLogMiddleware, log_format=cfg.server.log_format)
    # Then, on SIGTERM, refuse new requests and let the admitted ones finish (service/drain.py).
    svc.add_asgi_middleware(DrainMiddleware, role="gateway", grace_s=cfg.server.drain_grace_s,
                            retry_after_s=cfg.server.retry_after_s)
    svc.add_asgi_middleware(OpenAPIMiddleware, paths=paths(ENDPOINTS))
    # Client keys, when a keys file is configured: a request without a valid key or past its quota is
    # refused before its body takes an upload place or an in-flight slot (service/key_guard.py).
    keys = keys_file(cfg.server.api_keys, cfg.source)
    if keys is not None:
        svc.add_asgi_middleware(KeysMiddleware, path=keys, poll_s=cfg.server.api_keys_poll_s,
                                requests_per_s=cfg.server.api_key_requests_per_s,
                                concurrent=cfg.server.api_key_concurrent, retry_after_s=cfg.server.retry_after_s,
                                metric_names=cfg.server.api_key_metric_names)
    svc.add_asgi_middleware(LimitsMiddleware, max_body_bytes=cfg.server.max_body_bytes,
                            max_inflight=cfg.server.max_inflight, retry_after_s=cfg.server.retry_after_s,
                            body_timeout_s=cfg.server.body_timeout_s, max_uploads=cfg.server.max_uploads,
                            max_buffered_bytes=cfg.server.max_buffered_bytes)
    return svc


CONFIG = load_config()
install_connection_limits(CONFIG.server)  # header deadline, idle limit, connection cap (uvicorn)
Gateway = build_gateway(CONFIG)
