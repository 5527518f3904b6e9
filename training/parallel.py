"""`effnet train-many`: several variants trained side by side, one single-threaded process each.

Why not one after another with every core each: on these 2-core machines a training step scales badly
with threads. NOTE: measured 2026-11-27 (AVX2, 40x40, batch 128, `effnet train-bench`): b0 74 img/s
on 1 thread and 97 on 2; compact 84 and 122. Two 1-thread processes side by side ran 70 + 79 =
148 img/s, against ~110 for one 2-thread process. So `make checkpoints` trains its three variants at
once with `cores // variants` threads each (at least 1). Running 3 single-threaded processes on 2
cores is plain time-slicing, not the intra-op oversubscription that collapses PyTorch (FACTS.md):
no process waits at a barrier for a thread that lost its core.

Each child is `python -m training` with the same options as `effnet train`; its lines are printed
with the variant in front, and a summary table closes the run. One failure does not stop the others;
the exit status says whether all succeeded.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time


def threads_per_process(jobs: int, cores: int | None = None) -> int:
    if not cores:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, jobs))


def _pump(prefix: str, stream, lock: threading.Lock) -> None:
    for line in iter(stream.readline, ""):
        with lock:
            sys.stdout.write(f"{prefix} {line}")
            sys.stdout.flush()


def train_many(variants: list[str], train_args: list[str], threads: int = 0) -> int:
    """Train each variant in its own process with `train_args` (effnet train options); 0 if all succeeded."""
    if not variants:
        raise ValueError("no variants given")
    threads = threads or threads_per_process(len(variants))
    width = max(len(v) for v in variants)
    lock = threading.Lock()
    procs: dict[str, tuple[subprocess.Popen, float, threading.Thread]] = {}
    print(f"training {', '.join(variants)} side by side: {len(variants)} processes x {threads} thread(s)", flush=True)
    try:
        for v in variants:
            cmd = [sys.executable, "-m", "training", "--variant", v, "--threads", str(threads), *train_args]
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
            t = threading.Thread(target=_pump, args=(f"[{v:<{width}}]", p.stdout, lock), daemon=True)
            t.start()
            procs[v] = (p, time.perf_counter(), t)
        ended: dict[str, tuple[int, float]] = {}
        while len(ended) < len(procs):
            for v, (p, t0, t) in procs.items():
                if v not in ended and p.poll() is not None:
                    t.join(5)
                    ended[v] = (p.returncode, time.perf_counter() - t0)
            time.sleep(0.5)
    except KeyboardInterrupt:
        for p, _, _ in procs.values():
            if p.poll() is None:
                p.terminate()
        for p, _, _ in procs.values():
            p.wait()
        raise
    print(f"\n{'variant':<{width}}  status  wall", flush=True)
    for v in variants:
        rc, seconds = ended[v]
        print(f"{v:<{width}}  {'ok' if rc == 0 else f'rc {rc}':<6}  {seconds:.0f} s")
    failed = [v for v in variants if ended[v][0] != 0]
    if failed:
        print(f"failed: {', '.join(failed)} (their lines above say why)", file=sys.stderr)
    return 1 if failed else 0
