"""`effnet train-many`: several variants trained side by side, one single-threaded process each.

Why not one after another with every core each: on small CPUs a training step scales badly with
threads. Two 1-thread processes side by side train 148 img/s against ~110 for one 2-thread process
(benchmarks/training-quick.md), so `make checkpoints` trains its three variants at once with
`cores // variants` threads each (at least 1). Three single-threaded processes on 2 cores are plain
time-slicing, not intra-op oversubscription: no process waits at a barrier for a thread that lost its core.

Each child is `python -m training` with the same options as `effnet train`; its lines are printed
with the variant in front, and a summary table closes the run. One failure does not stop the others;
the exit status says whether all succeeded.
"""
from __future__ import annotations

import sys


def threads_per_process(jobs: int, cores: int | None = None) -> int:
    from engines.threads import available_cores

    return max(1, (cores or available_cores()) // max(1, jobs))


def train_many(variants: list[str], train_args: list[str], threads: int = 0) -> int:
    """Train each variant in its own process with `train_args` (effnet train options); 0 if all succeeded."""
    from engines.side_by_side import run_side_by_side

    if not variants:
        raise ValueError("no variants given")
    threads = threads or threads_per_process(len(variants))
    print(f"training {', '.join(variants)} side by side: {len(variants)} processes x {threads} thread(s)", flush=True)
    ended = run_side_by_side({v: [sys.executable, "-m", "training", "--variant", v, "--threads", str(threads),
                                  *train_args] for v in variants})
    width = max(len(v) for v in variants)
    print(f"\n{'variant':<{width}}  status  wall", flush=True)
    for v, (rc, seconds) in ended.items():
        print(f"{v:<{width}}  {'ok' if rc == 0 else f'rc {rc}':<6}  {seconds:.0f} s")
    failed = [v for v, (rc, _) in ended.items() if rc != 0]
    if failed:
        print(f"failed: {', '.join(failed)} (their lines above say why)", file=sys.stderr)
    return 1 if failed else 0
