"""The thread budget: inference threads across all workers never exceed the machine's cores.

Oversubscribed cores slow eager PyTorch down up to 13x where fair sharing would be 2x, ONNX Runtime
and OpenVINO about 3x (benchmarks/engines.md). So every worker runs a fixed, small number of
intra-op threads, derived here, and every runtime is told that number explicitly.
"""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


def available_cores() -> int:
    """Cores this process may run on (CPU affinity, e.g. `taskset` or a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def worker_threads(workers: int = 1, threads: int | None = None, cores: int | None = None) -> int:
    """Intra-op threads for each of `workers` inference workers.

    `threads` is the configured per-worker count (None or 0: derive it). The result never lets
    `workers * threads` exceed `cores`: a configured count that would is lowered, with a warning.
    With more workers than cores each gets 1 thread (the least possible), also with a warning.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    cores = cores or available_cores()
    fair = max(1, cores // workers)
    if workers > cores:
        log.warning("%d inference workers on %d cores: 1 thread each still oversubscribes; "
                    "use at most %d workers", workers, cores, cores)
    if not threads:
        return fair
    if threads > fair:
        log.warning("configured %d threads x %d workers > %d cores: using %d threads per worker",
                    threads, workers, cores, fair)
        return fair
    return threads


def set_threads(threads: int | None) -> int:
    """Pin this process's torch threads (intra-op to `threads`, inter-op to 1); returns the count.

    None or 0 means all available cores (a single worker). The ONNX Runtime and OpenVINO engines get
    the same count through their own session options.
    """
    n = threads or available_cores()
    torch.set_num_threads(n)
    try:
        # Inter-op parallelism only helps graphs with independent branches; these are chains.
        torch.set_num_interop_threads(1)
    except RuntimeError:  # can only be set before the first parallel op; keep what is there
        pass
    return n
