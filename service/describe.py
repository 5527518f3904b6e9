"""The bodies of GET /variants and GET /routes: what is served, how, and how ready."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

from .config import RouteConfig, ServingConfig


def variants(cfg: ServingConfig, manifests: dict[str, Any], status: dict[str, dict], problems: dict[str, str],
             transport: Callable[[str], str], replicas: Callable[[str], list[dict]] = lambda v: [],
             admitted: Callable[[str], int] = lambda v: 0,
             where: Callable[[str], dict | None] = lambda v: None,
             versions: Callable[[str], list[dict]] = lambda v: []) -> list[dict]:
    rows = []
    for name, v in cfg.variants.items():
        m, st = manifests.get(name), status.get(name, {})
        eng = st.get("engine") or {}
        routes = cfg.routes_of(name)
        rows.append({
            "variant": name, "model": v.model, "routes": routes,
            "weights": {r: cfg.routes[r].split.get(name, 0.0) for r in routes},
            "shadow_in": [r for r in routes if (s := cfg.routes[r].shadow) and s.variant == name],
            "placement": v.placement,  # worker: its own processes; gateway: in the gateway's (no HTTP hop)
            # workers elsewhere (`workers_at`): as configured, as resolved, and why the last resolution failed
            "workers_at": where(name),
            # how its batches reach it: shared_memory (service/shm.py), http (in the call's body), in_process
            "worker_transport": transport(name),
            "device": st.get("device"), "engine": eng.get("engine", v.engine),
            # which engine and precision serve and why: auto's timings, engines refused and their
            # reasons, the verification figures against eager PyTorch (engines.Engine.describe)
            "precision": eng.get("precision"),
            "engine_reason": eng.get("reason"),
            "engine_refused": eng.get("refused"),
            "engine_timings_ms": eng.get("timings_ms"),
            "engine_verification": eng.get("verification"),
            # A CPU batch runs on `threads` when the machine is idle, else on one (service.cpu_slots),
            # each with its own engine: {"1": ..., "2": ...}.
            "engines_by_threads": st.get("engines_by_threads"),
            # worker processes (or in-gateway streams) running, and how many have loaded their engines
            "threads": st.get("threads"), "workers": st.get("workers", v.workers),
            "workers_loaded": st.get("workers_loaded", 0), "calls_in_flight": v.resolved_calls_in_flight,
            "max_batch_size": v.max_batch_size, "max_latency_ms": v.max_latency_ms,
            "architecture": m.variant if m else None, "dataset": m.dataset if m else None,
            "resolution": m.resolution if m else None, "num_classes": m.num_classes if m else None,
            "params": m.params if m else None, "macs": m.macs if m else None,
            "offline_top1": m.metrics.get("top1") if m else None,
            # each version served (service/versions.py): its tag, share, state, top-1 and images answered
            "versions": versions(name),
            "ready": name in status and name not in problems, "problem": problems.get(name),
            # each worker replica's mark from the gateway's health checks (service/health.py)
            "replicas": replicas(name),
            # requests admitted to it now, and its own places (service/admission.py)
            "inflight": admitted(name), "max_inflight": v.resolved_max_inflight,
        })
    return rows


def routes_of(routes: Iterable[RouteConfig], manifests: dict[str, Any], changed_at: dict[str, str]) -> dict:
    return {
        r.name: {"split": r.split, "variants": r.variants,
                 "shadow": {"variant": r.shadow.variant, "fraction": r.shadow.fraction} if r.shadow else None,
                 "fallback": r.fallback,
                 # the experiment's control (GET /experiments/ROUTE), null when the route runs none
                 "control": r.control,
                 # what moves the split by itself (service/experiments/policy.py), null: only PATCH /routes
                 "policy": r.policy.as_dict() if r.policy else None,
                 "num_classes": manifests[r.variants[0]].num_classes if r.variants[0] in manifests else None,
                 # when a live change made the route differ from the configuration file (null: as the file)
                 "changed_at": changed_at.get(r.name)}
        for r in routes
    }


def routes(cfg: ServingConfig, manifests: dict[str, Any], changed_at: dict[str, str],
           changes_file: Path | None) -> dict:
    return {"default_route": cfg.default_route, "routes": routes_of(cfg.routes.values(), manifests, changed_at),
            "config": cfg.source, "route_changes": cfg.server.route_changes,
            "route_changes_file": str(changes_file) if changes_file else None}
