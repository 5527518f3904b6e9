"""Bulk work yields the CPU to the work that answers: `lower_priority(n)` makes every thread of a worker
process `n` nicer than the gateway; `lower_thread_priority(n)` makes one thread of the gateway (one that
decodes a big upload) `n` nicer than its event loop.

On a machine whose cores the workers fill with inference, a gateway at the same priority waits for CPU
like any thread: its refusals, health checks and `/readyz` then take hundreds of milliseconds, and a hung
variant's clients wait as long as the busy ones. Nicer workers leave the gateway its share at once and
lose nothing when the machine is otherwise idle. Linux keeps a nice value per thread (`setpriority`
with a thread id), and a new thread takes its creator's: every thread is changed, so the threads
started later (BentoML's pool, the engines' inference threads) are nicer as well.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def lower_priority(n: int) -> int:
    """Adds `n` to the nice value of every thread of this process (once: a second call adds nothing);
    returns the number of threads changed. Not an error where the system refuses (logged)."""
    if n <= 0 or getattr(lower_priority, "done", False):
        return 0
    lower_priority.done = True
    changed = 0
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # not Linux: the process's own nice value (one value for all its threads there)
        tids = [0]
    for tid in tids:
        changed += _renice(tid, n)
    return changed


def _renice(tid: int, n: int) -> bool:
    """Thread `tid` (0: this one) `n` nicer, at most 19; False where the system refuses (logged)."""
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + n))
        return True
    except OSError as e:  # a thread that ended meanwhile, or a sandbox that forbids it
        log.debug("could not lower the priority of thread %s: %s", tid, e)
        return False


_thread = __import__("threading").local()


def lower_thread_priority(n: int) -> bool:
    """Adds `n` to this thread's nice value, once per thread; True if it changed now. A pool thread
    stays nicer for whatever it runs later, which is bulk work as well."""
    import threading

    if n <= 0 or getattr(_thread, "lowered", False):
        return False
    _thread.lowered = True
    return _renice(threading.get_native_id(), n)
