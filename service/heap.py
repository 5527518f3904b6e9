"""Keep Python's full garbage collections off the request path: freeze what start-up built.

A serving process builds almost all of its objects at start-up (torch, BentoML, pydantic, the
configuration, the engines), and they live as long as the process. CPython's full (generation 2)
collection walks every one of them: under load the gateway ran one every 6-7 s, 160-170 ms each, and
the event loop, so every request in flight, waited for it (benchmarks/serving.md).

`gc.freeze()` (CPython >= 3.7) moves every tracked object into a permanent generation that later
collections skip; full passes then walk only what was made since. A cycle that was garbage at freeze
time would never be freed, so a full collection runs first.

`effnet_gc_pause_seconds` records every collection's pause per process and generation, and
`effnet_gc_frozen_objects` what each process froze, so the effect shows on /metrics.
"""
from __future__ import annotations

import gc
import logging
import threading
import time
from collections import deque

from . import metrics

logger = logging.getLogger("effnet.serving")

_watched: set[str] = set()


def freeze_startup_heap(process: str, variant: str) -> int:
    """Collect once, then freeze everything that survived; returns the number of objects frozen."""
    t0 = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    metrics.GC_FROZEN.labels(process, variant).set(frozen)
    logger.info("%s: %d start-up objects moved out of the garbage collector's passes (%.0f ms)",
                process, frozen, 1e3 * (time.perf_counter() - t0))
    return frozen


def watch_collector(process: str, variant: str, flush_every_s: float = 1.0):
    """Observe each collection's pause in `effnet_gc_pause_seconds` (once per process name). Returns the
    callback added to `gc.callbacks` (None when this name is watched already).

    The callback only appends to a deque, and a thread moves the pauses into the histogram. A
    collection can start inside any allocation, also one made while this thread holds prometheus_client's
    (non-reentrant) value lock, so observing from the callback itself could deadlock the process.
    """
    if process in _watched:
        return None
    _watched.add(process)
    pauses: deque[tuple[int, float]] = deque(maxlen=100_000)
    started = [0.0]
    by_generation = {g: metrics.GC_PAUSE.labels(process, variant, str(g)) for g in range(3)}

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses.append((info["generation"], time.perf_counter() - started[0]))

    def flush() -> None:
        while True:
            time.sleep(flush_every_s)
            while pauses:
                generation, seconds = pauses.popleft()
                by_generation[generation].observe(seconds)

    gc.callbacks.append(on_gc)
    threading.Thread(target=flush, name="effnet-gc-pauses", daemon=True).start()
    return on_gc
