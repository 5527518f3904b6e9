"""Run several commands side by side, each line of their output prefixed with its name.

For independent, mostly single-threaded jobs that would leave cores idle one after another:
`effnet train-many` (one trainer per variant) and the engine preparation of `effnet serve --prepare`
(one export per variant). It lives here, below both, so that training and engines can use it.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time


def _pump(prefix: str, stream, lock: threading.Lock) -> None:
    for line in iter(stream.readline, ""):
        with lock:
            sys.stdout.write(f"{prefix} {line}")
            sys.stdout.flush()


def run_side_by_side(commands: dict[str, list[str]], max_jobs: int = 0) -> dict[str, tuple[int, float]]:
    """Run `commands` (name -> argv), at most `max_jobs` at a time (0: all at once); returns each
    one's (exit status, wall seconds). Ctrl-C stops them all."""
    width = max(len(n) for n in commands)
    lock = threading.Lock()
    pending = list(commands)
    running: dict[str, tuple[subprocess.Popen, float, threading.Thread]] = {}
    ended: dict[str, tuple[int, float]] = {}
    try:
        while pending or running:
            while pending and (not max_jobs or len(running) < max_jobs):
                name = pending.pop(0)
                p = subprocess.Popen(commands[name], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     bufsize=1)
                t = threading.Thread(target=_pump, args=(f"[{name:<{width}}]", p.stdout, lock), daemon=True)
                t.start()
                running[name] = (p, time.perf_counter(), t)
            for name, (p, t0, t) in list(running.items()):
                if p.poll() is not None:
                    t.join(5)
                    ended[name] = (p.returncode, time.perf_counter() - t0)
                    del running[name]
            time.sleep(0.2)
    except KeyboardInterrupt:
        for p, _, _ in running.values():
            p.terminate()
        for p, _, _ in running.values():
            p.wait()
        raise
    return {name: ended[name] for name in commands}
