"""`effnet chaos`: faults injected one after another into the default service under steady load."""
from __future__ import annotations

import argparse
import sys

from .argtypes import bounded, existing_dir
from .loadtest import _run_name

EPILOG = """\
scenarios, in order (each: before_s of steady load, the fault until the touched streams answer 200 again,
after_s):
  kill-worker       kill -9 of b0's only worker, 24 clients on b0, steady traffic elsewhere
  kill-worker-70    the same with 70 clients on b0
  kill-one-of-two   kill -9 of one of lite0's two workers
  hang-worker       SIGSTOP of b0's worker for --hang-seconds, then SIGCONT
  slow-headers      --slow-connections connections sending half a request line, held --slow-hold seconds
  max-uploads       --uploads maximum-size uploads (max_body_mb) at once
  truncated-cache   an engine cache file of b0 cut in half, then its worker killed: rebuilt, served?
  kill-gateway      kill -9 of the gateway process
  sigterm           SIGTERM of the server under load (ends the server)
  read-only-store   a server started on a read-only copy of the store, under load

pass criteria (the issue's "Done when"): untouched streams 0 errors and p99 within 25% or 20 ms of
before (outside the restart seconds); the touched variant answers 200 (itself or its fallback) or a
429/503 within 100 ms from 2 s after the fault until it recovers; recovery within 15 s; /readyz
(polled every 250 ms, 1 s timeout: a timeout is a lie, except while the gateway process is gone)
never 200 while a counted variant is down; SIGTERM: no reset of a request admitted before the signal.

The server runs on a private copy of the store (--store, default $BENTOML_HOME), which the run may
damage; the store itself is never written. The clients run in a process of their own and honour
Retry-After (at most --retry-cap seconds). Exit status 1 if a scenario fails, unless --allow-fail."""


def _clients(text: str) -> dict[str, int]:
    """argparse type: `b0=24,imagenet=4` -> {stream: clients}."""
    out = {}
    for part in filter(None, text.split(",")):
        name, _, n = part.partition("=")
        try:
            out[name.strip()] = int(n)
        except ValueError:
            raise argparse.ArgumentTypeError(f"clients are STREAM=N pairs, e.g. b0=24,imagenet=4; got {part!r}") from None
        if not 0 <= out[name.strip()] <= 500:
            raise argparse.ArgumentTypeError(f"{part!r}: between 0 and 500 clients per stream")
    return out


def cmd_chaos(args: argparse.Namespace) -> int:
    from loadtest.chaos import ChaosConfig, execute, failed
    from loadtest.chaos_report import summary_table
    from loadtest.chaos_scenarios import SCENARIOS

    if args.list:
        for s in SCENARIOS.values():
            print(f"{s.name:<16} {s.description}")
        return 0
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()] if args.scenarios else None
    unknown = [s for s in scenarios or [] if s not in SCENARIOS]
    if unknown:
        print(f"effnet chaos: error: unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}",
              file=sys.stderr)
        return 2
    cfg = ChaosConfig(config=args.config, store_home=args.store, scenarios=scenarios, clients=args.clients,
                      default_clients=args.default_clients, before_s=args.before, after_s=args.after,
                      window_s=args.window, hang_s=args.hang_seconds, slow_connections=args.slow_connections,
                      slow_hold_s=args.slow_hold, uploads=args.uploads, retry_cap_s=args.retry_cap,
                      max_total_s=args.max_seconds, reports_dir=args.reports_dir, name=args.name)
    out, results = execute(cfg, log=lambda msg: print(msg, flush=True))
    print("\n" + summary_table(results))
    print(f"report: {out / 'report.md'}\ndata:   {out / 'results.json'}")
    bad = failed(results)
    if bad and not args.allow_fail:
        print(f"effnet chaos: failed: {', '.join(bad)} (--allow-fail records a run without failing)", file=sys.stderr)
        return 1
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser(
        "chaos", help="inject faults (kills, hangs, SIGTERM, slow clients, big uploads, damaged store) under load; "
                      "write reports/chaos-<run>/",
        description="Start the service on a private copy of the store, keep steady closed-loop load on every route "
                    "and on explicit variants, and run named fault scenarios one after another; for each, record "
                    "errors by status per stream, p99 before/during/after, seconds to recovery, the touched variant's "
                    "refusal latency, connection resets and whether /readyz told the truth. Writes report.md and "
                    "results.json under reports/chaos-<run>/. At most --max-seconds (570) in all.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--scenarios", help="comma-separated scenarios to run, in the order given (default: all; --list)")
    p.add_argument("--list", action="store_true", help="print the scenarios and exit")
    p.add_argument("--config", help="serving configuration (default: service/config.yaml)")
    p.add_argument("--store", type=existing_dir("store"), help="BENTOML_HOME holding the models, copied before the "
                   "run (default: $BENTOML_HOME or ~/bentoml)")
    p.add_argument("--clients", type=_clients, default={}, help="steady clients per stream, e.g. imagenet=4,fashion=2 "
                   "(streams: each route, and the variants compact and b0; a scenario's own counts win)")
    p.add_argument("--default-clients", type=bounded(int, 0, 500), default=2, help="steady clients of a stream not "
                   "named in --clients (default 2)")
    p.add_argument("--before", type=bounded(float, 1, 120, " s"), default=5.0, help="steady load before the fault (default 5)")
    p.add_argument("--after", type=bounded(float, 1, 120, " s"), default=5.0, help="steady load after the recovery (default 5)")
    p.add_argument("--window", type=bounded(float, 2, 300, " s"), default=20.0, help="the longest wait for a recovery (default 20)")
    p.add_argument("--hang-seconds", type=bounded(float, 0.5, 120, " s"), default=5.0, help="SIGSTOP to SIGCONT (default 5)")
    p.add_argument("--slow-connections", type=bounded(int, 1, 100000), default=5000, help="half-open connections (default 5000)")
    p.add_argument("--slow-hold", type=bounded(float, 1, 300, " s"), default=15.0, help="how long they stall (default 15)")
    p.add_argument("--uploads", type=bounded(int, 1, 4096), default=256, help="maximum-size uploads at once (default 256)")
    p.add_argument("--retry-cap", type=bounded(float, 0, 60, " s"), default=2.0, help="the longest Retry-After the clients honour (default 2)")
    p.add_argument("--max-seconds", type=bounded(float, 30, 3600, " s"), default=570.0, help="hard bound on the whole run; "
                   "scenarios that do not fit are skipped and noted (default 570)")
    p.add_argument("--allow-fail", action="store_true", help="exit 0 even if a scenario fails (to record a run)")
    p.add_argument("--reports-dir", default="reports", help="folder of the runs' reports (default: %(default)s)")
    p.add_argument("--name", type=_run_name, help="run name, a folder under --reports-dir (default: chaos-<UTC date-time>)")
    p.set_defaults(func=cmd_chaos)
