"""`effnet plan`: how many worker replicas of each variant of a route, on which recorded hardware, carry
a request rate within a p99 objective (loadtest/plan.py holds the model)."""
from __future__ import annotations

import argparse
import json

DESCRIPTION = """\
Size a route from the recorded load-test figures: for --rps requests per second on --route with a p99
of at most --p99 ms, how many worker replicas of each of the route's variants, on each hardware profile
that was measured, and the headroom that leaves.

The load per variant is the route's rate times its split share in the serving configuration, plus what
its shadow mirrors to it; on a route with a policy (bandit, promote, budget, cascade) each variant is
sized for the whole rate, since the policy may send it everything. One replica carries what one measured
host carried at its best step (most req/s) whose p99 stayed within --p99 with at most 1% errors;
replicas = ceil(load x (1 + --headroom) / that req/s). Each profile's figures come from its newest run
that measured the variant, never from steps of different runs. A variant with no such step says "cannot meet" (with the
lowest p99 measured), one without figures on a profile "not measured"; nothing is extrapolated.

Figures (--results, repeatable; default benchmarks/results/): load-test runs (a reports/RUN folder or
its results.json, or a recorded loadtest-*.md report) and GPU sessions' JSON (benchmarks/gpu/). Each
figure is cited with its file, date and machine. A profile is the measured machine: the CPU family
and core count, or the GPU model.

  effnet plan --route fashion --rps 1000 --p99 250
  effnet plan --route imagenet --rps 10000 --p99 100 --headroom 0.2 --json
  effnet plan --route fashion --rps 500 --p99 100 --results reports/RUN --profile NAME"""


def cmd_plan(args: argparse.Namespace) -> int:
    from loadtest.plan import (
        RESULTS,
        load_runs,
        make_plan,
        render,
        route_loads,
        to_dict,
    )
    from service.config import load_config

    cfg = load_config(args.config)
    route = args.route or cfg.default_route
    loads = route_loads(cfg, route, args.rps)
    runs = load_runs(args.results or [RESULTS])
    if not runs:
        raise ValueError(f"no load-test or GPU serving figures in {', '.join(args.results or [str(RESULTS)])}")
    profiles = [p for item in args.profile or [] for p in item.split(",") if p]
    plan = make_plan(route, args.rps, loads, runs, args.p99, profiles or None, args.headroom)
    print(json.dumps(to_dict(plan), indent=1) if args.json else render(plan))
    return 0


def add_commands(sub) -> None:
    from .argtypes import bounded

    p = sub.add_parser("plan", help="replicas per variant and hardware profile for a request rate and p99, "
                                    "from the recorded load-test figures",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--route", help="the route to size (default: the configuration's default route)")
    p.add_argument("--rps", type=bounded(float, 0.001, 1e9), required=True,
                   help="requests per second the route must answer")
    p.add_argument("--p99", type=bounded(float, 0.001, 1e7, " ms"), required=True,
                   help="the p99 latency objective in milliseconds, as the service measures it end to end")
    p.add_argument("--headroom", type=bounded(float, 0, 10), default=0.0,
                   help="spare capacity to keep per variant, as a fraction of its load: 0.2 sizes for 20%% more "
                        "than asked, for the drift between runs and a lost replica (default 0)")
    p.add_argument("--results", action="append", metavar="FILE_OR_DIR",
                   help="figures to plan from instead of benchmarks/results/: a load-test run folder, a "
                        "results.json, a recorded report .md or a GPU session JSON (repeat to combine)")
    p.add_argument("--profile", action="append", metavar="NAME[,NAME]",
                   help="plan only for these hardware profiles, as the plain output names them")
    p.add_argument("--config", help="serving configuration whose route is sized (default: the service's)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)
