"""Per variant: from a decoded batch to its `InferenceResult`.

Requests that wait for one variant go together as one call (service.coalesce). A call goes to the
variant's streams in this process (`placement: gateway`, service.inprocess), or to the worker replica
with the fewest calls in flight among those not marked down (service.health), its batch in shared
memory (service.shm) or in the HTTP body. Each call has a deadline (the variant's max_latency_ms plus a
second) and a short connect timeout. A dropped connection is tried again, on another replica first
(inference has no side effects); a connection that cannot be made, or that fails every retry, marks its
replica down, and so does a call past its deadline. A timeout, a busy worker or a variant whose every
replica is down is 503 + Retry-After; any other worker failure is 502.
"""
from __future__ import annotations

import asyncio
import base64
import functools
import logging
import time
from dataclasses import replace
from typing import Any, Callable

import numpy as np

from . import metrics, request_log
from .coalesce import Coalescer
from .config import ServingConfig
from .errors import ClientError, retry_later
from .health import DOWN, Health
from .inprocess import InProcessVariant
from .remote_workers import RemoteWorkers
from .results import InferenceResult
from .shm import Arena, Lease
from .versions import Versions, base_of

logger = logging.getLogger("effnet.gateway")

# Dropped connections between gateway and worker: BentoML's client closes pooled connections that a
# stalled worker dropped ("Can not write request body", benchmarks/gpu/README.md).
WORKER_RETRIES = 2


def wire_call(batch: np.ndarray, lease: Lease | None) -> dict:
    """The arguments of a worker's `predict_wire`: the batch's shared-memory references, or its pixels."""
    if lease is not None:
        return {"shape": list(batch.shape), "refs": lease.refs.tolist()}
    return {"shape": list(batch.shape), "pixels": base64.b64encode(np.ascontiguousarray(batch).tobytes()).decode()}


class Dispatcher:
    """Sends each variant's batches to where it runs; `replicas(variant)` gives its workers' proxies."""

    def __init__(self, cfg: ServingConfig, replicas: Callable[[str], list[Any]],
                 local: dict[str, InProcessVariant], replica_count: dict[str, int],
                 worker_service: Callable[[str], Any] | None = None, worker_token: str | None = None) -> None:
        self.cfg = cfg  # its variants and server settings do not change while serving
        self.own_replicas = replicas
        self.local = local  # variants served in this process
        self.coalescers: dict[str, Coalescer] = {}  # made on first use, inside the event loop
        # variant -> calls in flight to each of its worker replicas (the next call goes to the least busy)
        self.replica_calls: dict[str, list[int]] = {name: [0] * n for name, n in replica_count.items()}
        # variant -> its shared-memory arena, made at its first call; None: batches go in the HTTP body
        self.arenas: dict[str, Arena | None] = {}
        # Each worker replica's mark (up/down), checked periodically once `health.start()` runs; the
        # in-process variants have one stand-in replica each, whose check is their status.
        self.health = Health({**replica_count, **{name: 1 for name in local}}, self.check_replica,
                             cfg.server.health_interval_s, cfg.server.health_timeout_s)
        self._connect_set: set[int] = set()  # the worker clients whose connect timeout is set
        # Variants whose workers run elsewhere (`workers_at`): their replicas follow their addresses.
        self.remote = RemoteWorkers(cfg, self.health, self.replica_calls, worker_service or (lambda v: None),
                                    worker_token, on_change=self._replicas_resolved)
        self.versions: Versions | None = None  # set by the gateway: which version answers a request

    def replicas(self, variant: str) -> list[Any]:
        """The clients of a variant's worker replicas, by index."""
        return self.remote.clients[variant] if variant in self.remote else self.own_replicas(variant)

    def _replicas_resolved(self, variant: str, n: int) -> None:
        """A remote variant has `n` replicas now: unless its configuration fixes them, two calls in flight each."""
        if self.cfg.variants[base_of(variant)].calls_in_flight:
            return
        c = self.coalescers.get(variant)
        if c is not None:
            c.limit = 2 * max(1, n)

    async def check_replica(self, variant: str, i: int) -> dict:
        """Replica `i` of `variant`: its status (service.workers.VariantRunner.status), for service.health."""
        if variant in self.local:
            return self.local[variant].status()
        return await self.replicas(variant)[i].to_async.status()

    def down(self, variant: str) -> ClientError:
        """The answer for a variant whose every replica is marked down."""
        return retry_later(f"variant {variant!r} is down: {self.health.down_reason(variant)}; retry later",
                           self.cfg.server.retry_after_s)

    def _short_connect(self, client: Any) -> None:
        """Give a worker client (bentoml's aiohttp session) the short connect timeout, once; its total
        timeout stays BentoML's backstop, as each call has its own deadline."""
        if id(client) in self._connect_set:
            return
        self._connect_set.add(id(client))
        if not isinstance(getattr(type(client), "client", None), functools.cached_property):
            return  # not bentoml's client (a stand-in)
        try:
            import attr

            session = client.client
            session._timeout = attr.evolve(session._timeout, sock_connect=self.cfg.server.connect_timeout_s)
        except Exception as e:  # noqa: BLE001 - another aiohttp layout: the call deadline still bounds it
            logger.warning("worker calls keep their default connect timeout: %s", e)

    async def infer(self, variant: str, batch: np.ndarray) -> InferenceResult:
        """The scores for a uint8 batch, with the seconds it waited before its inference started and the
        version that answered (drawn by share, service/versions.py)."""
        key, version = self.versions.choose(variant) if self.versions is not None else (variant, "")
        c = self.coalescers.get(key)
        if c is None:
            v = self.cfg.variants[variant]
            # The coalescer sheds load for both placements: behind it, a worker's batcher sees at most
            # `calls_in_flight` calls and never a queue long enough to shed.
            call = self.call_local if key in self.local else self.call_worker
            c = Coalescer(lambda b: call(key, b), v.max_batch_size, v.resolved_calls_in_flight,
                          max_wait_s=v.max_latency_ms / 1000, too_late=lambda: self.at_capacity(variant))
            self.coalescers[key] = c
            if key in self.remote and not v.calls_in_flight:
                self._replicas_resolved(key, len(self.health.usable(key)))
        result = await c(batch)
        if version:
            self.versions.answered(variant, version, len(batch))
            return replace(result, version=version)
        return result

    # versions loaded while serving (service/versions.py): a key of their own, VARIANT@TAG

    def add_version(self, key: str, urls: list[str]) -> None:
        self.remote.add(key, urls)

    async def remove_version(self, key: str) -> None:
        self.coalescers.pop(key, None)
        self.arenas.pop(key, None)  # its memory goes with the last reference
        await self.remote.remove(key)

    def calls_pending(self, key: str) -> int:
        """Calls in flight to a key, and images waiting for one."""
        c = self.coalescers.get(key)
        return c.in_flight + c.queued_images if c is not None else 0

    def check_capacity(self, variant: str, images: int) -> None:
        """Refuse (503) before decoding what the variant's queue would refuse after it anyway."""
        c = self.coalescers.get(variant)
        if c is not None and c.overloaded(images):
            raise self.at_capacity(variant)

    def at_capacity(self, variant: str) -> ClientError:
        return retry_later(f"variant {variant!r} is at capacity; retry later", self.cfg.server.retry_after_s)

    def transport(self, variant: str) -> str:
        """How the variant's batches reach it now: in_process, shared_memory or http (for workers elsewhere,
        shared_memory if any of its replicas is on this host)."""
        if variant in self.local:
            return "in_process"
        if self.cfg.server.worker_transport == "http" or self.arenas.get(variant, True) is None:
            return "http"
        if variant in self.remote and not any(self._same_host(variant, i) for i in self.health.usable(variant)):
            return "http"
        return "shared_memory"

    def _same_host(self, variant: str, i: int) -> bool:
        """Whether replica `i` can read this process's shared memory: the gateway's own workers always can."""
        return variant not in self.remote or self.health.replicas[variant][i].same_host(self.health.namespaces)

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
                v = self.cfg.variants[base_of(variant)]
                try:
                    # Two slots per call in flight: a slot whose call failed unanswered waits out the
                    # worker's timeout before reuse, and its call's successor must not fall back for that.
                    arena = Arena(v.name, v.max_batch_size, batch.shape[1:], slots=2 * v.resolved_calls_in_flight,
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

        replicas, calls, health = self.replicas(variant), self.replica_calls[variant], self.health
        name = base_of(variant)  # `variant` may be a version's key (service/versions.py)
        deadline = self.cfg.variants[name].call_deadline_s
        failed: set[int] = set()
        lease, answered, attempt = None, False, 0
        try:
            while True:
                usable = health.usable(variant)
                if not usable:
                    raise self.down(variant) if health.is_down(variant) else self.not_serving(variant)
                # the replica with the fewest calls in flight, among those not marked down and not seen to
                # fail by this call; among equals, the first (a lone request always meets the same process)
                candidates = [k for k in usable if k not in failed] or usable
                i = min(candidates, key=calls.__getitem__)
                replica = health.replicas[variant][i]
                if self._same_host(variant, i):
                    if lease is None and attempt == 0:
                        lease = self._lease(variant, batch)
                elif lease is not None:  # a replica on another host: the pixels go in the body
                    lease.release(True)
                    lease = None
                self._short_connect(replicas[i].to_async)
                calls[i] += 1
                try:
                    async with asyncio.timeout(deadline) as timer:
                        replica.calls.add(timer)  # service.health ends it at once if the replica goes down
                        try:
                            with request_log.propagated():  # the batch's request ids, to the worker's logs
                                if variant in self.remote:  # JSON across the network
                                    answer = await replicas[i].to_async.predict_wire(**wire_call(batch, lease))
                                elif lease is not None:
                                    records = await replicas[i].to_async.predict_shared(lease.refs)
                                else:
                                    records = await replicas[i].to_async.predict(batch)
                        finally:
                            replica.calls.discard(timer)
                    answered, replica.called_at = True, time.monotonic()
                    metrics.WORKER_CALLS.labels(name, "http" if lease is None else "shared_memory").inc()
                    if variant in self.remote:
                        return InferenceResult.from_wire(answer, replica=f"worker {i + 1} ({replica.address})")
                    return InferenceResult.from_records(records, replica=f"worker {i + 1}")
                except (httpx.TimeoutException, TimeoutError):  # before the next clause: aiohttp's are both
                    if not timer.expired():  # the client's own timeout (BentoML's backstop)
                        raise retry_later(f"variant {variant!r} did not answer in time; retry later",
                                          self.cfg.server.retry_after_s) from None
                    if replica.state == DOWN:  # marked down while this call waited: another replica, or 503
                        failed.add(i)
                        if attempt < WORKER_RETRIES and [k for k in health.usable(variant) if k not in failed]:
                            attempt += 1
                            continue
                        raise self.down(variant) from None
                    health.mark_down(variant, i, "deadline", f"a call took longer than its deadline of {deadline:g} s")
                    raise retry_later(f"variant {variant!r} did not answer within its deadline of {deadline:g} s; "
                                      "retry later", self.cfg.server.retry_after_s) from None
                except (httpx.TransportError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
                    failed.add(i)  # a process that is gone or restarting: try another one first
                    refused = isinstance(e, (aiohttp.ClientConnectorError, httpx.ConnectError))
                    if refused or attempt == WORKER_RETRIES:
                        health.mark_down(variant, i, "connection", f"its connection failed ({type(e).__name__})")
                        if not refused:
                            raise ClientError(f"variant {variant!r}: worker connection failed ({type(e).__name__})",
                                              502) from None
                        if attempt == WORKER_RETRIES or not health.usable(variant):
                            raise self.down(variant) from None
                    attempt += 1
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

    def not_serving(self, variant: str) -> ClientError:
        """The answer for a variant whose replicas answer but have not loaded (or cannot load) its checkpoint."""
        errors = [r.status.get("error") for r in self.health.replicas[variant] if r.status and r.status.get("error")]
        why = errors[0] if errors else "its worker processes have not loaded"
        return retry_later(f"variant {variant!r} is not ready: {why}", self.cfg.server.retry_after_s)
