"""Whether the gateway and each variant can serve, from what the health checks find now (service.health).

A variant is ready when its checkpoint was loaded and verified by whoever runs it and a replica that
answers its checks serves it; at start-up, once every one of its replicas has loaded (so a start is
complete before /readyz says so), and from then on while at least one serves. Nothing latches: a
variant whose replicas are all down is not ready until one answers again.

Overall (`GET /readyz`), by `server.readiness`: `all` (every variant is ready) or `routes` (every
route has a ready variant in its split, or its fallback is ready). `GET /readyz/VARIANT` answers for
one. Neither waits on a worker: they read the marks of the last checks (at most
`health_interval_s + health_timeout_s` old). A classify request for a variant that cannot serve is
answered 503 with that variant's reason.
"""
from __future__ import annotations

import time
from typing import Any

from . import metrics
from .config import ServingConfig
from .health import DOWN, UNKNOWN, UP, Health


class Readiness:
    def __init__(self, cfg: ServingConfig, health: Health, problems: dict[str, str],
                 config_error: str | None = None) -> None:
        self.cfg = cfg  # its routes change with PATCH /routes (service.gateway.change_route)
        self.health = health
        self.start_problems = dict(problems)  # variant -> why it cannot serve, found at start (its manifest)
        self.config_error = config_error
        self.loaded_once: set[str] = set()  # variants whose every replica has loaded at some point
        self.status: dict[str, dict] = {}  # variant -> its status, as the last checks found it
        self.problems: dict[str, str] = dict(problems)  # variant -> why it is not ready now
        self.ready = False  # as of the last refresh
        self.published = False  # the first ready's work (variant info, heap freeze) is done

    def why_not_ready(self, variant: str) -> str | None:
        """Why `variant` is not ready now (for /readyz), or None."""
        if variant in self.start_problems:
            return self.start_problems[variant]
        reps = [r for r in self.health.replicas.get(variant, []) if not r.retired]
        if not reps and variant in self.health.replicas:  # workers elsewhere, none resolved (yet)
            return f"variant {variant!r} has no worker replica: none was found at its workers_at"
        serving = [r for r in reps if r.state == UP and r.status and r.status.get("ready")]
        # Workers elsewhere come and go on their own: one that serves is enough from the start.
        if serving and (variant in self.loaded_once or len(serving) == len(reps) or reps[0].address):
            self.loaded_once.add(variant)
            return None
        if serving:
            return f"variant {variant!r}: {len(serving)} of {len(reps)} worker processes loaded"
        errors = [r.status["error"] for r in reps if r.state == UP and r.status and r.status.get("error")]
        if errors:  # a checkpoint that failed its checks, or a variant still loading in the gateway
            return errors[0]
        if reps and all(r.state == DOWN for r in reps):
            return f"variant {variant!r} is down: {self.health.down_reason(variant)}"
        if any(r.state == UNKNOWN for r in reps):
            return f"variant {variant!r}: not checked yet"
        return f"variant {variant!r}: not loaded"

    def problem(self, variant: str, manifests: dict[str, Any]) -> str | None:
        """Why a request for `variant` cannot be served now ("loading" while its manifest is unknown), or
        None. Lenient where /readyz is strict: a replica not checked yet may still be called."""
        if variant in self.start_problems or variant not in manifests:
            return self.start_problems.get(variant, "loading")
        if self.health.usable(variant) or not self.health.replicas.get(variant):
            return None
        return self.why_not_ready(variant)

    def reasons(self) -> list[str]:
        """Why the gateway is not ready under `server.readiness` (empty: ready)."""
        reasons = [self.config_error] if self.config_error else []
        why = {v: self.why_not_ready(v) for v in self.cfg.variants}
        if self.cfg.server.readiness == "all":
            return reasons + [w for w in why.values() if w]
        for route in self.cfg.routes.values():
            candidates = [v for v, w in route.split.items() if w > 0] + ([route.fallback] if route.fallback else [])
            if all(why[v] for v in candidates):
                reasons.append(f"route {route.name!r} has no variant that serves: "
                               + "; ".join(why[v] for v in candidates))
        return reasons

    def refresh(self) -> list[str]:
        """Recompute the status, problems, gauges and overall readiness from the health marks; the reasons."""
        for v in self.cfg.variants:
            reps = [r for r in self.health.replicas.get(v, []) if not r.retired]
            known = [r.status for r in reps if r.status]
            why = self.why_not_ready(v)
            if known:
                serving = sum(1 for r in reps if r.state == UP and r.status and r.status.get("ready"))
                self.status[v] = {**known[0], "workers": len(reps), "workers_loaded": serving,
                                  "ready": why is None, "error": why}
            if why is None:
                self.problems.pop(v, None)
            else:
                self.problems[v] = why
            metrics.VARIANT_READY.labels(v).set(0 if why else 1)
        reasons = self.reasons()
        self.ready = not reasons
        return reasons

    def variant(self, variant: str) -> dict:
        """GET /readyz/VARIANT: whether it is ready, why not, and each replica's mark."""
        now = time.monotonic()
        why = self.why_not_ready(variant)
        reps = self.health.replicas.get(variant, [])
        return {"variant": variant, "ready": why is None, "problem": why,
                "replicas": [{"replica": i + 1, "state": "retired" if r.retired else r.state, "reason": r.reason,
                              "pid": r.pid, "for_s": round(now - r.since, 1),
                              **({"address": r.address, "same_host": r.same_host(self.health.namespaces)}
                                 if r.address else {})} for i, r in enumerate(reps)]}


class VariantInfo:
    """`effnet_variant_info`: one series at 1 per variant; a series whose labels changed (a route change
    moved the variant into or out of a route) is set to 0."""

    def __init__(self) -> None:
        self.labels: dict[str, tuple[str, ...]] = {}

    def publish(self, cfg: ServingConfig, manifests: dict[str, Any], status: dict[str, dict]) -> None:
        for name, v in cfg.variants.items():
            if name not in manifests:  # it has no checkpoint to describe
                continue
            m, st = manifests[name], status.get(name, {})
            eng = st.get("engine") or {}
            now = (name, ",".join(cfg.routes_of(name)), v.model, str(m.params), str(m.macs),
                   str(m.metrics.get("top1", "")), str(m.resolution), st.get("device", ""),
                   eng.get("engine", v.engine), str(eng.get("precision", "")))
            if self.labels.get(name, now) != now:
                metrics.VARIANT_INFO.labels(*self.labels[name]).set(0)
            metrics.VARIANT_INFO.labels(*now).set(1)
            self.labels[name] = now
