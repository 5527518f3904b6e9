"""Gateway-side batching: requests for one variant that wait together go to its worker as one call.

Why: each gateway -> worker call costs the same HTTP work whatever it carries (a request through
uvicorn, BentoML's middleware, pickling, the batcher's queue and a thread hop in the worker; the
client side in the gateway): 4-7 ms of CPU per call against 0.5-1.3 ms of inference for the 32x32
models (benchmarks/serving.md). BentoML's adaptive batching merges calls only after each has paid it.

How: at most `limit` calls per variant are in flight. A request that finds a free slot is sent at
once, alone (no added latency at low load); the others queue, and each finished call sends what
queued meanwhile as one batch of up to `max_batch` images (a single request above it goes alone).
The worker's batcher still merges the calls that meet there. A failed call fails every request it
carried with the same error, as each would have failed alone (bad images never get this far).
Load shedding, with `max_wait_s` (the variant's max_latency_ms): a request is refused at once with
`too_late()` when the images queued and in flight ahead of it, at the seconds per image that recent
calls took, would not be done within it; one that has waited longer than that when its turn comes is
refused then instead of running. This is the gateway's job, not BentoML's batcher's: behind at most
`limit` calls at once, the worker's batcher never sees a queue long enough to shed.
"""
from __future__ import annotations

import asyncio
import contextvars
import time
from collections import deque
from typing import Awaitable, Callable

import numpy as np

from . import request_log
from .results import InferenceResult

# send(batch) -> the batch's scores, with the seconds its inference took
Send = Callable[[np.ndarray], Awaitable[InferenceResult]]


class Coalescer:
    def __init__(self, send: Send, max_batch: int, limit: int, max_wait_s: float | None = None,
                 too_late: Callable[[], Exception] = TimeoutError) -> None:
        if max_batch < 1 or limit < 1:
            raise ValueError("max_batch and limit must be at least 1")
        self.send, self.max_batch, self.limit = send, max_batch, limit
        self.max_wait_s, self.too_late = max_wait_s, too_late
        # (batch, its future, when it was queued, its request's ids: service/request_log.py)
        self.queue: deque[tuple[np.ndarray, asyncio.Future, float, tuple]] = deque()
        self.in_flight = 0
        self.queued_images = 0  # images in `queue`
        self.in_flight_images = 0  # images in the calls being answered
        self.seconds_per_image: float | None = None  # moving average over recent calls: wall time / images

    def expected_seconds(self, images: int) -> float | None:
        """Roughly how long `images` more would take to be answered, behind what waits and runs now."""
        if self.seconds_per_image is None:
            return None
        return (self.queued_images + self.in_flight_images + images) * self.seconds_per_image / self.limit

    def overloaded(self, images: int) -> bool:
        """Whether `images` more would be refused now: calls are all taken and the work ahead would
        not be done within `max_wait_s` (a request sent at once is never refused)."""
        return (self.max_wait_s is not None and bool(self.queue)
                and (self.expected_seconds(images) or 0.0) > self.max_wait_s)

    async def __call__(self, batch: np.ndarray) -> InferenceResult:
        """The result for `batch`, with the seconds it waited before its inference started (gateway
        queue, transport and the worker's own queue) as its `waited`."""
        if self.overloaded(len(batch)):
            raise self.too_late()
        fut = asyncio.get_running_loop().create_future()
        self.queue.append((batch, fut, time.perf_counter(), request_log.current_ids()))
        self.queued_images += len(batch)
        self._pump()
        return await fut

    def _pump(self) -> None:
        while self.queue and self.in_flight < self.limit:
            items, n = [], 0
            late = time.perf_counter() - self.max_wait_s if self.max_wait_s is not None else None
            while self.queue and (not items or n + len(self.queue[0][0]) <= self.max_batch):
                item = self.queue.popleft()
                self.queued_images -= len(item[0])
                if item[1].done():  # a request whose client went away is dropped, not sent
                    continue
                if late is not None and item[2] < late:
                    item[1].set_exception(self.too_late())
                    continue
                items.append(item)
                n += len(item[0])
            if not items:
                continue
            self.in_flight += 1
            self.in_flight_images += n
            # The call runs with its own requests' ids (logged with it, passed to the worker), not with
            # those of whichever request's task happened to start it.
            ctx = contextvars.Context()
            ctx.run(request_log.bind, [item[3] for item in items])
            asyncio.get_running_loop().create_task(self._call(items, n), context=ctx)

    async def _call(self, items: list[tuple[np.ndarray, asyncio.Future, float, tuple]], n: int) -> None:
        try:
            batch = items[0][0] if len(items) == 1 else np.concatenate([item[0] for item in items])
            sent = time.perf_counter()
            result = await self.send(batch)
            done, start = time.perf_counter(), 0
            per_image = (done - sent) / n
            old = self.seconds_per_image
            self.seconds_per_image = per_image if old is None else 0.8 * old + 0.2 * per_image
            for b, fut, queued, _ in items:
                if not fut.done():
                    fut.set_result(result.rows(start, start + len(b), max(0.0, done - queued - result.seconds)))
                start += len(b)
        except BaseException as e:  # noqa: BLE001 - handed to every waiting request, cancellation included
            for _, fut, _, _ in items:
                if not fut.done():
                    fut.set_exception(e if isinstance(e, Exception) else asyncio.CancelledError())
            if not isinstance(e, Exception):
                raise
        finally:
            self.in_flight -= 1
            self.in_flight_images -= n
            self._pump()
