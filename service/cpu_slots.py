"""Core slots: the CPU thread budget shared by every worker process of one server.

The server has `cpu_threads` slots (default: the cores available), one lock file each, shared by all
worker processes through BENTOML_HOME (tests give each server its own). A CPU worker runs a batch only
while it holds slots, one per inference thread, so inference threads never exceed the budget however
many variants and processes are served: oversubscribing 2 cores makes eager PyTorch 13x slower
(benchmarks/engines.md).

Threads are elastic: a batch takes every slot when the machine is idle (the lowest latency for a lone
request) and one slot when it is busy (single-thread batches side by side): two single-thread
OpenVINO streams carry about 40% more images/s than one two-thread stream (benchmarks/serving.md),
because a two-thread batch waits for its slower thread, and on a busy machine one of the two is
always interrupted by HTTP work.

"Idle" is every slot free now *and* none seen busy by this process in the last `CONTENDED_S`: with
"every slot free now" alone, two busy processes catch each other between batches and take both slots
half the time, and the other then waits (benchmarks/serving.md).

flock locks belong to the open file, so they die with the process: a killed worker never leaves a
slot taken. A stopped or hung one does, so a wait for a slot is bounded (`max_wait_s`): past it the
batch runs without a slot, one thread, rather than let one variant's hung process stall every other
variant's inference; while that lasts, waits are short (`STUCK_WAIT_S`). Only non-blocking tries are
made while holding a slot, and a wait is made only while holding none (or, for `hold_all`, in index
order), so no two holders can deadlock.
"""
from __future__ import annotations

import fcntl
import os
import random
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from store.paths import bentoml_home
from typing import Iterator

SLOTS_ENV = "EFFNET_CPU_SLOTS"
CONTENDED_S = 0.2  # after seeing a busy slot, run single-threaded for this long (about 10 busy batches)
# A slot held longer than any batch takes (lite0's batch of 8 on one thread is about 0.1 s) is held by a
# stopped or hung process: run without it. Once seen, later waits give up sooner, for STUCK_FOR_S. Half
# the health check's timeout: the other variants' calls answer before a check could take them for hung.
MAX_WAIT_S = 0.5
STUCK_WAIT_S = 0.05
STUCK_FOR_S = 2.0


def slots_dir() -> Path:
    """Shared by every worker of one server: `$BENTOML_HOME/run/cpu-slots` unless $EFFNET_CPU_SLOTS says."""
    home = bentoml_home()
    return Path(os.environ.get(SLOTS_ENV) or home / "run" / "cpu-slots")


class CoreSlots:
    """`n` cross-process slots; `hold(most)` yields how many this batch got (1 or `most`)."""

    def __init__(self, n: int, folder: Path | None = None, contended_s: float = CONTENDED_S,
                 max_wait_s: float = MAX_WAIT_S) -> None:
        if n < 1:
            raise ValueError(f"need at least one CPU slot, got {n}")
        folder = folder or slots_dir()
        folder.mkdir(parents=True, exist_ok=True)
        self.n = n
        self.fds = [os.open(folder / f"slot-{i}.lock", os.O_RDWR | os.O_CREAT, 0o600) for i in range(n)]
        # flock is per open file: two threads of one process would both "get" the same slot.
        self._local = threading.Lock()
        self.contended_s = contended_s
        self.contended_at = -1e9  # monotonic time this process last found a slot busy
        self.max_wait_s = max_wait_s
        self.stuck_at = -1e9  # monotonic time a wait last ran out (a slot held by a stopped or hung process)
        self.unslotted = 0  # batches that ran without a slot because the wait ran out

    def _try(self, i: int) -> bool:
        try:
            fcntl.flock(self.fds[i], fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _release(self, held: list[int]) -> None:
        for i in held:
            fcntl.flock(self.fds[i], fcntl.LOCK_UN)

    def _acquire(self, most: int) -> list[int]:
        most = max(1, min(most, self.n))
        if most > 1 and time.monotonic() - self.contended_at < self.contended_s:
            most = 1  # busy lately: stay single-threaded rather than catch the others between batches
        start = random.randrange(self.n)  # spread single-slot holders over the files
        held: list[int] = []
        busy = False
        for k in range(self.n):
            i = (start + k) % self.n
            if len(held) == most:
                # Probe the rest (lock and unlock at once) so a single-threaded process notices when
                # the machine has gone quiet, and when it has not.
                if self._try(i):
                    fcntl.flock(self.fds[i], fcntl.LOCK_UN)
                else:
                    busy = True
            elif self._try(i):
                held.append(i)
            else:
                busy = True
        if busy:
            self.contended_at = time.monotonic()
        if len(held) == most:
            return held
        if held:
            # `most` or one, never in between: a worker loads one engine per thread count it
            # may use, and {1, most} is two engines (on 2 cores, the only two counts there are).
            self._release(held[1:])
            return held[:1]
        return self._wait_for_one(start)

    def _wait_for_one(self, start: int) -> list[int]:
        """Holding nothing, wait for any slot; [] when the wait runs out (see the module docstring)."""
        now = time.monotonic()
        limit = STUCK_WAIT_S if now - self.stuck_at < STUCK_FOR_S else self.max_wait_s
        deadline, pause = now + limit, 0.0005
        while True:
            for k in range(self.n):
                i = (start + k) % self.n
                if self._try(i):
                    return [i]
            if time.monotonic() >= deadline:
                self.stuck_at = time.monotonic()
                self.unslotted += 1
                return []
            time.sleep(pause)
            pause = min(pause * 2, 0.002)  # a hand-off costs at most ~2 ms of a batch's wait

    @contextmanager
    def hold(self, most: int) -> Iterator[int]:
        """Hold `most` slots if the machine is idle (see above), else one (waiting for it if need be);
        yields the thread count to run with (1 without a slot, when the wait ran out)."""
        with self._local:
            held = self._acquire(most)
            try:
                yield max(1, len(held))
            finally:
                self._release(held)

    @contextmanager
    def hold_all(self) -> Iterator[int]:
        """Every slot, waiting in index order (loading and `auto` timing need the whole machine)."""
        with self._local:
            for i in range(self.n):
                fcntl.flock(self.fds[i], fcntl.LOCK_EX)
            try:
                yield self.n
            finally:
                self._release(list(range(self.n)))

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
