"""The replicas of variants whose workers run elsewhere (`workers_at`, service/worker_addresses.py).

Each address is one replica, with its own client, its own mark and checks (service/health.py) and its
own count of calls in flight (service/dispatch.py), exactly as the gateway's own workers. A dns:// name
is resolved again every `resolve_every_s`: an address that appears becomes a replica (checked before
it is called), one that disappears is retired (its calls in flight end at once and it is called no
more), and one that comes back is checked again. Replicas keep their index for the gateway's life, so
a retired one stays in the lists, marked. A name that does not resolve keeps the replicas it had.

A replica on this host (the same pid and network namespaces, service.health.Replica.same_host) gets
its batches through shared memory like the gateway's own workers; any other gets them in the body.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Callable

from . import metrics
from .config import ServingConfig
from .health import Health
from .worker_addresses import Addresses, addresses, resolve

logger = logging.getLogger("effnet.gateway")


class RemoteWorkers:
    """`variant -> [client per replica]` for the variants with `workers_at`, kept current."""

    def __init__(self, cfg: ServingConfig, health: Health, replica_calls: dict[str, list[int]],
                 worker_service: Callable[[str], Any], token: str | None = None,
                 on_change: Callable[[str, int], None] | None = None) -> None:
        self.cfg = cfg
        self.health, self.replica_calls = health, replica_calls
        self.worker_service = worker_service  # variant -> its worker's BentoML service class (the API's shape)
        self.token = token
        self.on_change = on_change  # (variant, replicas resolved now): the dispatcher's calls in flight follow
        self.where: dict[str, Addresses] = {}
        self.urls: dict[str, list[str]] = {}  # by replica index
        self.clients: dict[str, list[Any]] = {}
        self.errors: dict[str, str | None] = {}  # the last resolution's failure
        self.task: asyncio.Task | None = None
        for name, v in cfg.variants.items():
            if v.workers_at:
                self._register(name, addresses(v.workers_at))

    def _register(self, key: str, where: Addresses) -> None:
        self.where[key] = where
        self.urls[key], self.clients[key], self.errors[key] = [], [], None
        self.health.replicas.setdefault(key, [])
        self.replica_calls.setdefault(key, [])

    def __contains__(self, variant: str) -> bool:
        return variant in self.where

    def add(self, key: str, urls: list[str]) -> None:
        """Replicas at fixed `urls` for a key that starts now (a version the gateway loads, service/versions.py)."""
        self._register(key, Addresses(urls=tuple(urls)))
        self.apply(key, urls)

    async def remove(self, key: str) -> None:
        """Forget a key's replicas (its calls are done): no more checks, its clients closed."""
        if key not in self.where:
            return
        for i in range(len(self.health.replicas.get(key, []))):
            self.health.retire(key, i, "its version was unloaded")
        self.health.replicas.pop(key, None)
        self.replica_calls.pop(key, None)
        del self.where[key], self.urls[key], self.errors[key]
        for c in self.clients.pop(key):
            with contextlib.suppress(Exception):
                await c.close()

    def client(self, variant: str, url: str) -> Any:
        """BentoML's client of a worker service at `url`, in BentoML's own wire format between its services."""
        from _bentoml_impl.client import RemoteProxy

        # JSON, not BentoML's pickle between its own services: a server's entry service refuses pickle from
        # the network, rightly (the worker answers in JSON, service.results.InferenceResult.to_wire).
        proxy = RemoteProxy(url, service=self.worker_service(variant), media_type="application/json")
        # What `async with proxy` does first: with the service given and no readiness wait, only the API's
        # methods are set up (BentoML 1.4's client); the health checks say when the worker is ready.
        proxy.to_async._setup_endpoints()
        if self.token:  # service/worker_app.py: the worker answers only its gateway (the sync client wraps this one)
            proxy.to_async.default_headers["Authorization"] = f"Bearer {self.token}"
        return proxy

    def apply(self, variant: str, urls: list[str]) -> None:
        """The variant's addresses are `urls` now: add, retire and revive replicas to match."""
        known = self.urls[variant]
        for url in urls:
            if url in known:
                self.health.revive(variant, known.index(url))
                continue
            i = self.health.add(variant, url)
            assert i == len(known), "replica indexes of a remote variant are its addresses' order"
            known.append(url)
            self.clients[variant].append(self.client(variant, url))
            self.replica_calls[variant].append(0)
            metrics.REPLICA_UP.labels(variant, str(i + 1)).set(0)
            logger.info("variant %s: worker replica %d at %s", variant, i + 1, url)
        for i, url in enumerate(known):
            if url not in urls and not self.health.replicas[variant][i].retired:
                self.health.retire(variant, i, f"its address {url} is no longer resolved from "
                                   f"{self.where[variant].describe()}")
        if self.on_change is not None:
            self.on_change(variant, len(urls))

    async def refresh(self, variant: str) -> None:
        try:
            urls = await resolve(self.where[variant])
        except OSError as e:  # keep what it had: a DNS hiccup must not take the replicas away
            why = f"{self.where[variant].describe()} does not resolve: {e}"
            if why != self.errors[variant]:
                logger.warning("variant %s: %s; keeping its %d replica(s)", variant, why, len(self.urls[variant]))
            self.errors[variant] = why
            return
        self.errors[variant] = None
        self.apply(variant, urls)

    async def run(self) -> None:
        """Resolve every variant's addresses now, then each dns:// name again every `resolve_every_s`."""
        await asyncio.gather(*(self.refresh(v) for v in self.where))
        dynamic = {v: self.cfg.variants[v].resolve_every_s for v, a in self.where.items() if a.dynamic}
        if not dynamic:
            return
        loop = asyncio.get_running_loop()
        due = {v: loop.time() + every for v, every in dynamic.items()}
        while True:
            await asyncio.sleep(max(0.0, min(due.values()) - loop.time()))
            for v in [v for v, t in due.items() if t <= loop.time()]:
                await self.refresh(v)
                due[v] = loop.time() + dynamic[v]

    def start(self) -> None:
        if self.where and (self.task is None or self.task.done()):
            self.task = asyncio.get_running_loop().create_task(self.run(), name="effnet-worker-addresses")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        for clients in self.clients.values():
            for c in clients:
                with contextlib.suppress(Exception):
                    await c.close()

    def describe(self, variant: str) -> dict:
        """For GET /variants: where its workers are, as configured and as resolved."""
        return {"workers_at": self.where[variant].describe(), "addresses": list(self.urls[variant]),
                "resolve_error": self.errors[variant]}
