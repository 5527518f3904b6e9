"""Variants served inside the gateway process (`placement: gateway`): inference without the HTTP hop.

Why: a call from the gateway to a worker process goes through BentoML's client, an HTTP request
over the loopback, the worker's uvicorn and middleware, pickling, its batcher and a thread hand-off:
5.6 ms of an 18.1 ms lite0 request at 1 client, and the hop is HTTP, not batching (benchmarks/serving.md).

How: the variant's `workers` become streams in the gateway process, each a `VariantRunner` with
engines of its own (one batch at a time per runner), drawing on the same core slots as the worker
processes (service.cpu_slots), so the thread budget holds. The gateway's coalescer sends at most one
call per stream; what waits meanwhile goes together as the next batch. A batch runs in a thread;
OpenVINO, ONNX Runtime and PyTorch release the GIL while they compute, so the event loop keeps
parsing and decoding other requests.

Load shedding: BentoML's batcher answers 503 once a request's estimated wait passes `max_latency_ms`;
here a request that has already waited that long in the queue is answered 503 when its turn comes
(service.coalesce, `max_wait_s`).

The torch engines read the process-wide thread count (`torch.set_num_threads`), so two streams of a
torch engine in the gateway may run at each other's count; OpenVINO and ONNX Runtime (what `auto`
chooses for the default variants) take theirs per engine.

The price: no isolation. An engine that crashes takes the gateway with it (a worker process would be
restarted alone), and the variant loads inside the gateway process (in a thread, while the gateway
answers /livez). Keep it for the variants whose latency matters more than that.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import replace
from typing import Any

import anyio
import numpy as np

from bentoml.exceptions import ServiceUnavailable

from . import metrics
from .config import ServingConfig, VariantConfig, variant_device, variant_threads
from .results import InferenceResult
from .workers import VariantRunner

logger = logging.getLogger("effnet.gateway")


class InProcessVariant:
    """`v.workers` runners of one variant in this process, and an async `predict` that uses a free one.

    The runners load in a thread of their own, so that the gateway answers /livez (and 503 with the
    reason on /readyz and on this variant's requests) while they load, as a worker process's gateway
    does while that process loads: a liveness probe must not kill a gateway that is only loading.
    """

    def __init__(self, v: VariantConfig, cfg: ServingConfig, gpu_present: bool) -> None:
        self.v, self.cfg = v, cfg
        self.threads = variant_threads(v, cfg)
        self.use_gpu = v.gpu > 0 and gpu_present
        # One stream on a GPU, as one worker process there: the device serialises the work anyway.
        self.wanted = 1 if self.use_gpu else v.workers
        self.runners: list[VariantRunner] = []
        self.failed: VariantRunner | None = None  # the runner whose loading failed, with its reason
        self.error: str | None = None
        self._free: asyncio.Queue | None = None  # made on first use, inside the server's event loop
        metrics.VARIANT_READY.labels(v.name).set(0)
        self._loader = threading.Thread(target=self._load, name=f"effnet-load-{v.name}", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        try:
            while len(self.runners) < self.wanted:
                runner = VariantRunner(self.v, self.cfg, self.use_gpu)
                if runner.error is not None:
                    self.failed, self.error = runner, runner.error
                    break
                self.runners.append(runner)
        except Exception as e:  # VariantRunner reports its own failures; this is anything else
            logger.exception("variant %s: loading in the gateway process failed", self.v.name)
            self.error = f"variant {self.v.name!r}, checkpoint {self.v.model!r}: loading failed ({type(e).__name__}: {e})"
        if self.error is None:
            logger.info("variant %s: served in the gateway process, %d stream(s)", self.v.name, len(self.runners))
            metrics.VARIANT_READY.labels(self.v.name).set(1)

    @property
    def loaded(self) -> bool:
        return self.error is None and len(self.runners) >= self.wanted

    def status(self) -> dict[str, Any]:
        v = self.v
        if self.failed is not None:
            return self.failed.status(self.threads, 0, self.wanted, placement="gateway")
        if self.loaded:
            return self.runners[0].status(self.threads, len(self.runners), self.wanted, placement="gateway")
        return {"variant": v.name, "model": v.model, "device": variant_device(v, self.use_gpu),
                "threads": self.threads, "workers": self.wanted, "workers_loaded": len(self.runners),
                "placement": "gateway", "ready": False,
                "max_batch_size": v.max_batch_size, "max_latency_ms": v.max_latency_ms,
                "error": self.error or f"variant {v.name!r}: loading in the gateway process "
                                       f"({len(self.runners)} of {self.wanted} streams loaded)"}

    async def predict(self, batch: np.ndarray) -> InferenceResult:
        """Like the worker's `predict`, without the trip through records."""
        if not self.loaded:
            raise ServiceUnavailable(self.status()["error"])
        if self._free is None:
            self._free = asyncio.Queue()
            for r in self.runners:
                self._free.put_nowait(r)
        runner = await self._free.get()
        try:
            result = await anyio.to_thread.run_sync(runner.run, batch)
            return replace(result, replica="in_process")
        finally:
            self._free.put_nowait(runner)
