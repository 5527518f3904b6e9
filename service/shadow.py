"""Shadowing: a fraction of a route's requests also go to its shadow variant, in the background.

The agreement of the shadow's top-1 with the answer given is counted (`effnet_shadow_requests_total`), and in
an experiment the shadow's answer is recorded beside the one given (`answered`); the client never waits for the shadow, and at most MAX_SHADOW_INFLIGHT mirrored calls run at once
(beyond that a mirror is skipped and counted so, never queued).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

import numpy as np

from . import metrics
from .decode import resize_for
from .dispatch import Dispatcher
from .routing import Assignment

logger = logging.getLogger("effnet.gateway")

MAX_SHADOW_INFLIGHT = 16


class Shadows:
    def __init__(self, dispatcher: Dispatcher, manifests: dict[str, Any]) -> None:
        self.dispatcher, self.manifests = dispatcher, manifests
        self.tasks: set[asyncio.Task] = set()
        self.answered: Callable[[str, str, str, Any, float], None] | None = None

    def mirror(self, a: Assignment, batch: np.ndarray, primary_top1: list[int], ids: list[str] | None = None) -> None:
        """Send `batch` to `a.shadow` in the background and count where it agrees with `primary_top1`; each
        answer goes to `answered` (request id, route, shadow, scores, latency ms) when set: an experiment
        records it beside the answer it mirrored."""
        if len(self.tasks) >= MAX_SHADOW_INFLIGHT:
            metrics.SHADOW.labels(a.route, a.shadow, a.variant, "skipped").inc(len(primary_top1))
            return

        async def run() -> None:
            try:
                m_p, m_s = self.manifests[a.variant], self.manifests[a.shadow]
                b = resize_for(batch, m_s) if m_s.resolution != m_p.resolution else batch
                t0 = time.perf_counter()
                result = await self.dispatcher.infer(a.shadow, b)
                ms = round((time.perf_counter() - t0) * 1000, 2)
                for k, (top, row) in enumerate(zip(primary_top1, result.scores)):
                    agreed = "agree" if int(np.argmax(row)) == top else "disagree"
                    metrics.SHADOW.labels(a.route, a.shadow, a.variant, agreed).inc()
                    if self.answered is not None and ids is not None:
                        self.answered(ids[k], a.route, a.shadow, row, ms)
            except Exception as e:
                logger.warning("shadow %s failed: %s", a.shadow, e)
                metrics.SHADOW.labels(a.route, a.shadow, a.variant, "error").inc(len(primary_top1))

        task = asyncio.get_running_loop().create_task(run())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
