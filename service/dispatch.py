"""Per variant: from a decoded batch to its `InferenceResult`.

Requests that wait for one variant go together as one call (service.coalesce). A call goes to the
variant's streams in this process (`placement: gateway`, service.inprocess), or to the worker replica
with the fewest calls in flight, its batch in shared memory (service.shm) or in the HTTP body. A dropped
connection is tried again, on another replica first (inference has no side effects); a timeout or a
busy worker is 503 + Retry-After; any other worker failure is 502.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np

from . import metrics
from .coalesce import Coalescer
from .config import ServingConfig
from .errors import ClientError, retry_later
from .inprocess import InProcessVariant
from .results import InferenceResult
from .shm import Arena, Lease

logger = logging.getLogger("effnet.gateway")

# Dropped connections between gateway and worker: BentoML's client closes pooled connections that a
# stalled worker dropped ("Can not write request body", benchmarks/gpu/README.md).
WORKER_RETRIES = 2


class Dispatcher:
    """Sends each variant's batches to where it runs; `replicas(variant)` gives its workers' proxies."""

    def __init__(self, cfg: ServingConfig, replicas: Callable[[str], list[Any]],
                 local: dict[str, InProcessVariant], replica_count: dict[str, int]) -> None:
        self.cfg = cfg  # its variants and server settings do not change while serving
        self.replicas = replicas
        self.local = local  # variants served in this process
        self.coalescers: dict[str, Coalescer] = {}  # made on first use, inside the event loop
        # variant -> calls in flight to each of its worker replicas (the next call goes to the least busy)
        self.replica_calls: dict[str, list[int]] = {name: [0] * n for name, n in replica_count.items()}
        # variant -> its shared-memory arena, made at its first call; None: batches go in the HTTP body
        self.arenas: dict[str, Arena | None] = {}

    async def infer(self, variant: str, batch: np.ndarray) -> InferenceResult:
        """The scores for a uint8 batch, with the seconds it waited before its inference started."""
        c = self.coalescers.get(variant)
        if c is None:
            v = self.cfg.variants[variant]
            # The coalescer sheds load for both placements: behind it, a worker's batcher sees at most
            # `calls_in_flight` calls and never a queue long enough to shed.
            call = self.call_local if variant in self.local else self.call_worker
            c = Coalescer(lambda b: call(variant, b), v.max_batch_size, v.resolved_calls_in_flight,
                          max_wait_s=v.max_latency_ms / 1000, too_late=lambda: self.at_capacity(variant))
            self.coalescers[variant] = c
        return await c(batch)

    def check_capacity(self, variant: str, images: int) -> None:
        """Refuse (503) before decoding what the variant's queue would refuse after it anyway."""
        c = self.coalescers.get(variant)
        if c is not None and c.overloaded(images):
            raise self.at_capacity(variant)

    def at_capacity(self, variant: str) -> ClientError:
        return retry_later(f"variant {variant!r} is at capacity; retry later", self.cfg.server.retry_after_s)

    def transport(self, variant: str) -> str:
        """How the variant's batches reach it now: in_process, shared_memory or http."""
        if variant in self.local:
            return "in_process"
        if self.cfg.server.worker_transport == "http" or self.arenas.get(variant, True) is None:
            return "http"
        return "shared_memory"

    async def call_local(self, variant: str, batch: np.ndarray) -> InferenceResult:
        """One call to a variant's streams in this process."""
        local = self.local[variant]
        if not local.loaded:  # failed, or still loading (in its thread, service/inprocess.py)
            raise retry_later(local.status()["error"], self.cfg.server.retry_after_s)
        try:
            return await local.predict(batch)
        except Exception as e:  # an engine failure: the request is not at fault, and the message is ours
            logger.exception("variant %s: in-process inference failed", variant)
            raise ClientError(f"variant {variant!r}: inference failed ({type(e).__name__})", 502) from None

    def _lease(self, variant: str, batch: np.ndarray) -> Lease | None:
        """The batch written into the variant's shared-memory arena, or None: send it in the body."""
        if variant not in self.arenas:
            arena = None
            if self.cfg.server.worker_transport == "shared_memory":
                v = self.cfg.variants[variant]
                try:
                    # Two slots per call in flight: a slot whose call failed unanswered waits out the
                    # worker's timeout before reuse, and its call's successor must not fall back for that.
                    arena = Arena(variant, v.max_batch_size, batch.shape[1:], slots=2 * v.resolved_calls_in_flight,
                                  quarantine_s=self.cfg.server.timeout_s + 5)
                except OSError as e:  # no memfd on this system, or no memory left for it
                    logger.warning("variant %s: batches go in the HTTP body, shared memory is not available: %s",
                                   variant, e)
            self.arenas[variant] = arena
        arena = self.arenas[variant]
        return arena.put(batch) if arena is not None else None

    async def call_worker(self, variant: str, batch: np.ndarray) -> InferenceResult:
        """One call to one of the variant's worker processes."""
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
                        records = await replicas[i].to_async.predict_shared(lease.refs)
                    else:
                        records = await replicas[i].to_async.predict(batch)
                    answered = True
                    metrics.WORKER_CALLS.labels(variant, "http" if lease is None else "shared_memory").inc()
                    return InferenceResult.from_records(records, replica=f"worker {i + 1}")
                except (httpx.TimeoutException, TimeoutError):  # before the next clause: aiohttp's are both
                    raise retry_later(f"variant {variant!r} did not answer in time; retry later",
                                      self.cfg.server.retry_after_s) from None
                except (httpx.TransportError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
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
                        raise self.at_capacity(variant) from None
                    raise ClientError(f"variant {variant!r}: worker failed ({status})", 502) from None
                finally:
                    calls[i] -= 1
        finally:
            if lease is not None:
                lease.release(answered)
