"""One load step's Locust processes: a single headless process, or a master and N workers
(Locust distributed), and what they leave behind (statistics CSV, tallies).

A distributed step runs `locust --master --expect-workers N --headless` and N `locust --worker`
processes on 127.0.0.1. The master does not use `-t` to end the step (it would quit the workers with
requests in flight, which Prometheus then counts and Locust does not): the locustfile's `--run-seconds`
stops the workers gracefully, collects their tallies and quits. Both shapes leave the same files:
`<prefix>_tally.json` (the tallies, merged over the workers), `<prefix>_tally_stats.csv` and
`<prefix>_tally_failures.csv` (Locust's final statistics).
"""
from __future__ import annotations

import csv
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .images import CACHE_ENV
from .processes import ROOT, free_port, stop_process

if TYPE_CHECKING:
    from .run import RunConfig

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
# How long the workers may take to start (import Locust, load the catalog) before the master gives up.
WORKERS_WAIT_S = 60


class RunAborted(RuntimeError):
    pass


def read_locust_csv(prefix: Path) -> dict[str, dict]:
    """`<prefix>_stats.csv` -> {request name: {count, failures, p50/p95/p99 ms, rps}}."""
    path = Path(f"{prefix}_stats.csv")
    if not path.is_file():
        return {}
    out = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            def num(key):
                try:
                    return float(row[key])
                except (KeyError, ValueError, TypeError):
                    return None

            out[row["Name"]] = {"count": int(num("Request Count") or 0), "failures": int(num("Failure Count") or 0),
                                "p50_ms": num("50%"), "p95_ms": num("95%"), "p99_ms": num("99%"),
                                "rps": num("Requests/s"), "type": row.get("Type")}
    return out


def read_locust_failures(prefix: Path) -> dict[str, int]:
    path = Path(f"{prefix}_failures.csv")
    if not path.is_file():
        return {}
    out: dict[str, int] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            key = f"{row.get('Name')}: {row.get('Error')}"
            out[key] = out.get(key, 0) + int(row.get("Occurrences") or 0)
    return out


def locust_commands(cfg: RunConfig, url: str, user_class: str, users: int, out_prefix: Path, extra: list[str],
                    run_s: float, master_port: int | None = None) -> list[list[str]]:
    """The command lines of one step: [the headless process], or [the master, worker 1, ... worker N]."""
    base = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--host", url, "--loglevel", "WARNING"]
    # The locustfile's own options; a master passes them on to its workers, which need them at start too.
    custom = ["--bad-share", str(cfg.bad_share), "--fashion-images", str(cfg.fashion_images), "--seed", str(cfg.seed),
              *extra]
    run = ["--headless", "-u", str(users), "-r", str(users), "--stop-timeout", str(int(cfg.stop_timeout_s)),
           "--csv", str(out_prefix), "--only-summary", "--exit-code-on-error", "0",
           "--results-json", f"{out_prefix}_tally.json"]
    seconds = max(1, int(round(run_s)))
    if not cfg.locust_workers:
        return [[*base, *run, "-t", f"{seconds}s", *custom, user_class]]
    port = master_port or free_port()
    # -t only as a backstop: --run-seconds ends the step, gracefully.
    master = [*base, *run, "--master", "--master-bind-host", "127.0.0.1", "--master-bind-port", str(port),
              "--expect-workers", str(cfg.locust_workers), "--expect-workers-max-wait", str(WORKERS_WAIT_S),
              "--run-seconds", str(seconds), "--stop-file", f"{out_prefix}.stop",
              "-t", f"{seconds + int(cfg.stop_timeout_s) + 60}s", *custom, user_class]
    worker = [*base, "--worker", "--master-host", "127.0.0.1", "--master-port", str(port), *custom, user_class]
    return [master] + [list(worker) for _ in range(cfg.locust_workers)]


def run_locust_step(cfg: RunConfig, url: str, user_class: str, users: int, out_prefix: Path,
                    extra: list[str], run_s: float | None = None, watch=None) -> dict:
    """One step at `users` concurrent users for `run_s` (default `cfg.step_s`) seconds: one headless Locust
    process, or a master and `cfg.locust_workers` workers. `watch()`, called every `cfg.poll_s`, ends it early
    (gracefully: in-flight requests finish) by returning True."""
    run_s = cfg.step_s if run_s is None else run_s
    cmds = locust_commands(cfg, url, user_class, users, out_prefix, extra, run_s)
    env = {**os.environ, "PYTHONPATH": str(ROOT), CACHE_ENV: str(out_prefix.parent / "images")}
    logs = [Path(f"{out_prefix}_locust.log")] + [Path(f"{out_prefix}_locust-w{i}.log") for i in range(1, len(cmds))]
    stop_file = Path(f"{out_prefix}.stop")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.time()
    procs: list[subprocess.Popen] = []
    try:
        for cmd, log_path in zip(cmds, logs):
            with open(log_path, "wb") as log:
                procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        main = procs[0]
        # Locust starts in a few seconds (workers: WORKERS_WAIT_S at most), runs run_s, drains for stop_timeout.
        limit = time.monotonic() + run_s + cfg.stop_timeout_s + 60 + (WORKERS_WAIT_S if len(procs) > 1 else 0)
        try:
            while main.poll() is None:
                try:
                    left = max(0.0, limit - time.monotonic())
                    main.wait(timeout=min(cfg.poll_s, left) if watch else left)
                except subprocess.TimeoutExpired:
                    if time.monotonic() >= limit:
                        raise
                    if watch and watch():
                        if len(procs) > 1:
                            stop_file.touch()  # the master stops its workers gracefully
                        else:
                            stop_process(main, timeout=2 * cfg.stop_timeout_s + 10)
        except subprocess.TimeoutExpired:
            raise RunAborted(f"locust step ({user_class}, {users} users) did not end in time; see {logs[0]}") from None
    finally:
        # Workers outlive their master (it stops them, they wait for the next test): once the master has
        # their tallies and statistics and has quit, they are ended.
        for proc in procs:
            stop_process(proc, timeout=4)
        stop_file.unlink(missing_ok=True)
    ended = time.time()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    tally_path = Path(f"{out_prefix}_tally.json")
    tally = json.loads(tally_path.read_text()) if tally_path.is_file() else {}
    main = procs[0]
    if main.returncode not in (0, None) and not tally:
        tail = logs[0].read_bytes()[-2000:].decode(errors="replace")
        raise RunAborted(f"locust failed ({main.returncode}): {tail}")
    return {"started": started, "ended": ended,
            "locust_cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
            # The final CSV the locustfile writes at quit; Locust's periodic one can miss the last second.
            "stats": read_locust_csv(Path(f"{out_prefix}_tally")) or read_locust_csv(out_prefix),
            "failures": read_locust_failures(Path(f"{out_prefix}_tally")) or read_locust_failures(out_prefix),
            "tally": tally, "locust_processes": len(procs),
            "returncode": main.returncode}
