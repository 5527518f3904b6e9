"""Whether the gateway can serve: every variant's checkpoint loaded and verified by whoever runs it.

`/readyz` answers 503 with the reasons until then (a bad checkpoint is named with its problem), and a
classify request for a variant that is not ready is answered 503 with that variant's reason.
"""
from __future__ import annotations

import time
from typing import Any, Awaitable, Callable

from . import metrics
from .config import ServingConfig


class Readiness:
    """Each variant's status (from its workers or its in-process streams) and its problem, if any."""

    def __init__(self, variants: list[str], status_of: Callable[[str], Awaitable[dict]],
                 problems: dict[str, str], config_error: str | None = None) -> None:
        self.variants = variants
        self.status_of = status_of  # variant -> its status (raises while its workers are not reachable)
        self.problems = problems  # variant -> why it cannot serve (from its manifest or its worker)
        self.status: dict[str, dict] = {}  # variant -> its status once ready
        self.config_error = config_error
        self.ready = False
        self.checked_at = 0.0  # the last check made on a request's behalf

    async def reasons(self) -> list[str]:
        """Why the gateway is not ready (empty once it is; it stays ready from then on)."""
        if self.ready:
            return []
        reasons = [self.config_error] if self.config_error else []
        for name in self.variants:
            try:
                st = await self.status_of(name)
            except Exception as e:
                reasons.append(self.problems.get(name) or f"variant {name!r}: worker not reachable yet ({type(e).__name__})")
                continue
            if not st.get("ready"):
                self.problems[name] = st.get("error") or self.problems.get(name) or f"variant {name!r}: not loaded"
                reasons.append(self.problems[name])
            else:
                self.status[name] = st
                self.problems.pop(name, None)  # e.g. "1 of 2 worker processes loaded" while it started
        self.ready = not reasons
        return reasons

    def due(self) -> bool:
        """Whether a request should check readiness on its way: while not ready, at most once a second."""
        if self.ready or time.monotonic() - self.checked_at <= 1.0:
            return False
        self.checked_at = time.monotonic()
        return True

    def problem(self, variant: str, manifests: dict[str, Any]) -> str | None:
        """Why `variant` cannot answer now ("loading" while its manifest is unknown), or None."""
        if variant in self.problems or variant not in manifests:
            return self.problems.get(variant, "loading")
        return None


class VariantInfo:
    """`effnet_variant_info`: one series at 1 per variant; a series whose labels changed (a route change
    moved the variant into or out of a route) is set to 0."""

    def __init__(self) -> None:
        self.labels: dict[str, tuple[str, ...]] = {}

    def publish(self, cfg: ServingConfig, manifests: dict[str, Any], status: dict[str, dict]) -> None:
        for name, v in cfg.variants.items():
            m, st = manifests[name], status[name]
            eng = st.get("engine") or {}
            now = (name, ",".join(cfg.routes_of(name)), v.model, str(m.params), str(m.macs),
                   str(m.metrics.get("top1", "")), str(m.resolution), st.get("device", ""),
                   eng.get("engine", v.engine), str(eng.get("precision", "")))
            if self.labels.get(name, now) != now:
                metrics.VARIANT_INFO.labels(*self.labels[name]).set(0)
            metrics.VARIANT_INFO.labels(*now).set(1)
            self.labels[name] = now

