"""`effnet soak`: the default service at about half its capacity for a set time; RSS, open files and threads
of every process sampled, their growth per hour judged against the goals."""
from __future__ import annotations

import argparse
import re
import sys

from .loadtest import _run_name

DESCRIPTION = """\
Start the service (`effnet serve`, the default store and configuration) on 127.0.0.1, find its capacity
with a short closed-loop ramp (wrk on every route at once, 1/4/16 connections per route, 5 s each; the
best level's req/s per route), then load every route at --share of that capacity (default half) for
--duration, paced by wrk's delay between requests. Every --interval seconds: RSS, open files and threads
of each server process (the `bentoml serve` supervisor, the gateway, each worker), and the load's
req/s, statuses and p99 per route.

The report (reports/soak-RUN/report.md, results.json, rss.png) gives each process's growth per hour from
a least-squares line through the samples after the warm-up (the larger of 10% of the run and 2 minutes,
at most half of it; --warmup to set it) and judges it against the goals: RSS growth under 50 MB/h
(--rss-goal), no growth of open files or threads. The run also fails when a process ends early (a
restarted worker), the server exits, or more than 1% of requests fail.

Exit status: 0 when every goal is met, 1 when one is missed (0 with --record-only), 2 for a bad option,
130 when interrupted (the report covers the run until then). Everything started is stopped at the end,
also on Ctrl-C and SIGTERM."""

_UNITS = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600}


def duration(text: str) -> float:
    """argparse type: `90`, `90s`, `30m`, `1.5h` -> seconds, within 10 s .. 24 h."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|min|h)?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected a duration such as 90s, 30m or 1h, got {text!r}")
    seconds = float(m.group(1)) * _UNITS[m.group(2) or ""]
    if not 10 <= seconds <= 24 * 3600:
        raise argparse.ArgumentTypeError(f"expected 10 s .. 24 h, got {text}")
    return seconds


def cmd_soak(args: argparse.Namespace) -> int:
    from loadtest.soak import SoakConfig, execute

    if args.interval * 3 > args.duration:
        print(f"effnet soak: error: --interval {args.interval:g} s leaves fewer than 3 samples in --duration "
              f"{args.duration:g} s", file=sys.stderr)
        return 2
    if args.warmup is not None and args.warmup >= args.duration:
        print("effnet soak: error: --warmup must be shorter than --duration", file=sys.stderr)
        return 2
    cfg = SoakConfig(duration_s=args.duration, interval_s=args.interval, share=args.share,
                     connections=args.connections, warmup_s=args.warmup, rss_goal_mb_per_h=args.rss_goal,
                     config=args.config, store_home=args.store, reports_dir=args.reports_dir, name=args.name,
                     ready_timeout_s=args.ready_timeout)
    out, results = execute(cfg, log=lambda msg: print(msg, flush=True))
    print(f"\nreport: {out / 'report.md'}\nplot:   {out / 'rss.png'}\ndata:   {out / 'results.json'}")
    if args.publish:
        from loadtest.soak_report import publish

        print("published " + ", ".join(str(p) for p in publish(out, args.publish)))
    v = results["verdict"]
    print("verdict: " + ("PASS" if v["pass"] else "FAIL: " + "; ".join(v["reasons"])))
    if any("interrupted" in n for n in results["notes"]):
        return 130
    return 0 if v["pass"] or args.record_only else 1


def add_commands(sub) -> None:
    from .argtypes import bounded, existing_dir

    p = sub.add_parser("soak", help="run the service at half its capacity for a while; judge memory, fd and "
                                    "thread growth per process; write reports/soak-<run>/",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=duration, default=3600.0, help="how long to soak: 90s, 30m, 1h (default 1h; at most 24h)")
    p.add_argument("--interval", type=bounded(float, 2, 600, " s"), default=10.0,
                   help="seconds per load interval and sample (default 10)")
    p.add_argument("--share", type=bounded(float, 0.05, 1.0), default=0.5, help="share of the ramp's capacity to soak at (default 0.5)")
    p.add_argument("--connections", type=bounded(int, 1, 64), default=4, help="wrk connections per route while soaking (default 4)")
    p.add_argument("--warmup", type=bounded(float, 0, 24 * 3600, " s"),
                   help="seconds left out of the fits (default: the larger of 10%% of the run and 120, at most half)")
    p.add_argument("--rss-goal", type=bounded(float, 0.1, 1e6, " MB/h"), default=50.0, help="RSS growth goal per process, MB per hour (default 50)")
    p.add_argument("--record-only", action="store_true", help="write the report and exit 0 even when a goal is missed")
    p.add_argument("--config", help="serving configuration (default: service/config.yaml)")
    p.add_argument("--store", type=existing_dir("store"), help="BENTOML_HOME holding the models (default: $BENTOML_HOME or ~/bentoml)")
    p.add_argument("--ready-timeout", type=bounded(float, 10, 3600, " s"), default=600.0,
                   help="seconds to wait for the service to be ready (a first start prepares engines; default 600)")
    p.add_argument("--publish", metavar="DIR", help="also copy the report, data and plot into DIR as soak-RUN.md/.json/.png "
                                                    "(e.g. benchmarks/results/DATE-HOST)")
    p.add_argument("--reports-dir", default="reports", help="folder of the reports (default: %(default)s)")
    p.add_argument("--name", type=_run_name, help="run name: the report goes to REPORTS_DIR/soak-NAME (default: UTC date-time)")
    p.set_defaults(func=cmd_soak)
