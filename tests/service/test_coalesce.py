"""Gateway-side batching (service.coalesce): requests that wait for one variant go as one call."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.coalesce import Coalescer
from service.results import InferenceResult


class FakeWorker:
    """Answers each image with its own first pixel as the score, after `delay` seconds; records calls."""

    def __init__(self, delay: float = 0.05, fail: Exception | None = None) -> None:
        self.delay, self.fail, self.calls = delay, fail, []
        self.active = self.most_active = 0

    async def __call__(self, batch: np.ndarray) -> InferenceResult:
        self.calls.append(len(batch))
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.active -= 1
        if self.fail is not None:
            raise self.fail
        return InferenceResult(batch[:, :1, 0, 0].astype(np.float32), 0.01)


def _img(i: int, n: int = 1) -> np.ndarray:
    return np.full((n, 3, 2, 2), i, np.uint8)


def test_a_lone_request_is_sent_at_once_and_alone():
    async def go():
        w = FakeWorker()
        c = Coalescer(w, max_batch=8, limit=1)
        r = await c(_img(7))
        return w.calls, r.scores, r.waited

    calls, scores, wait = asyncio.run(go())
    assert calls == [1] and scores.tolist() == [[7.0]] and wait >= 0


def test_requests_that_wait_go_together_and_each_gets_its_own_rows():
    async def go():
        w = FakeWorker()
        c = Coalescer(w, max_batch=8, limit=1)
        results = await asyncio.gather(*(c(_img(i, n=1 + i % 2)) for i in range(6)))
        return w.calls, results

    calls, results = asyncio.run(go())
    # the first goes alone; the five that queued behind it (8 images) go as one call
    assert calls == [1, 8]
    for i, r in enumerate(results):
        assert r.scores.tolist() == [[float(i)]] * (1 + i % 2)
        assert r.waited >= 0
    assert results[5].waited > results[0].waited  # the queued ones waited for the first call


def test_a_call_never_exceeds_max_batch_and_a_large_request_goes_alone():
    async def go():
        w = FakeWorker()
        c = Coalescer(w, max_batch=4, limit=1)
        results = await asyncio.gather(c(_img(0)), *(c(_img(i)) for i in range(1, 7)), c(_img(9, n=6)))
        return w.calls, results

    calls, results = asyncio.run(go())
    assert calls == [1, 4, 2, 6] and max(calls[:-1]) <= 4
    assert results[-1].scores.shape == (6, 1)


def test_up_to_limit_calls_run_at_once_and_never_more():
    async def go():
        w = FakeWorker(delay=0.1)
        c = Coalescer(w, max_batch=1, limit=3)
        await asyncio.gather(*(c(_img(i)) for i in range(7)))
        return w

    w = asyncio.run(go())
    assert w.calls == [1] * 7 and w.most_active == 3  # side by side up to the limit, not one after another


def test_a_failed_call_fails_every_request_it_carried_and_the_next_ones_still_go():
    async def go():
        w = FakeWorker(fail=RuntimeError("worker at capacity"))
        c = Coalescer(w, max_batch=8, limit=1)
        first = await asyncio.gather(*(c(_img(i)) for i in range(4)), return_exceptions=True)
        w.fail = None
        after = await c(_img(5))
        return first, after, c.in_flight

    first, after, in_flight = asyncio.run(go())
    assert all(isinstance(e, RuntimeError) and "capacity" in str(e) for e in first)
    assert after.scores.tolist() == [[5.0]] and in_flight == 0


def test_a_request_whose_client_went_away_is_not_sent():
    async def go():
        w = FakeWorker(delay=0.1)
        c = Coalescer(w, max_batch=8, limit=1)
        first = asyncio.ensure_future(c(_img(1)))
        gone = asyncio.ensure_future(c(_img(2)))
        kept = asyncio.ensure_future(c(_img(3)))
        await asyncio.sleep(0.02)
        gone.cancel()
        await asyncio.gather(first, kept)
        return w.calls, kept.result().scores

    calls, kept = asyncio.run(go())
    assert calls == [1, 1] and kept.tolist() == [[3.0]]


@pytest.mark.parametrize("max_batch, limit", [(0, 1), (4, 0)])
def test_limits_must_be_positive(max_batch, limit):
    with pytest.raises(ValueError):
        Coalescer(FakeWorker(), max_batch, limit)


def test_with_max_wait_a_request_that_waited_too_long_is_refused_not_run():
    """Variants in the gateway process have no BentoML batcher to shed load: the coalescer does."""
    class Late(Exception):
        pass

    async def go():
        w = FakeWorker(delay=0.2)
        c = Coalescer(w, max_batch=8, limit=1, max_wait_s=0.1, too_late=Late)
        first = asyncio.ensure_future(c(_img(1)))
        await asyncio.sleep(0.01)
        queued = asyncio.ensure_future(c(_img(2)))  # waits 0.19 s for the first call: too long
        done = await asyncio.gather(first, queued, return_exceptions=True)
        after = await c(_img(3))  # an idle coalescer runs at once whatever max_wait_s is
        return w.calls, done, after

    calls, (first, queued), after = asyncio.run(go())
    assert calls == [1, 1]  # the late request was never sent
    assert first.scores.tolist() == [[1.0]] and isinstance(queued, Late) and after.scores.tolist() == [[3.0]]


def test_with_max_wait_a_request_that_could_not_be_answered_in_time_is_refused_at_once():
    """Shedding must not wait for the budget to pass: a burst of large batches is refused up front,
    by the images ahead of it at the seconds per image that recent calls took."""
    class Late(Exception):
        pass

    async def go():
        w = FakeWorker(delay=0.05)  # 0.05 s a call, whatever its size
        c = Coalescer(w, max_batch=4, limit=1, max_wait_s=0.5, too_late=Late)
        await c(_img(1))  # measured: 0.05 s per image
        busy = asyncio.ensure_future(c(_img(2)))  # sent at once: never refused, however slow the estimate
        await asyncio.sleep(0)
        fits = asyncio.ensure_future(c(_img(3, n=4)))  # (1 + 4) x 0.05 s ahead of its answer: 0.25 s, fits
        await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(Late):
            await c(_img(4, n=8))  # (1 + 4 + 8) x 0.05 = 0.65 s > 0.5 s
        refused_after = loop.time() - t0
        await asyncio.gather(busy, fits)
        return w.calls, refused_after, c.expected_seconds(1), c.queued_images, c.in_flight_images

    calls, refused_after, idle_estimate, queued, in_flight = asyncio.run(go())
    assert refused_after < 0.02  # at once, not after the budget
    assert calls == [1, 1, 4]  # the refused batch was never sent
    assert queued == 0 and in_flight == 0 and idle_estimate is not None
