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
