"""`effnet loadtest` (step-load run with Locust and Prometheus) and `effnet report` (render, compare)."""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from .argtypes import bounded, existing_dir, int_list


def _run_name(text: str) -> str:
    """argparse type: the run's folder under --reports-dir, so one plain name (`--name ../../etc` would write
    the report outside the repository)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", text):
        raise argparse.ArgumentTypeError(f"a run name is letters, digits, '.', '_' and '-' (a folder under "
                                         f"--reports-dir), got {text[:64]!r}")
    return text


def cmd_loadtest(args: argparse.Namespace) -> int:
    from loadtest.run import RunConfig, execute

    # Options left out keep RunConfig's defaults (one place for them).
    given = {k: v for k, v in {
        "fashion_images": args.fashion_images, "experiment_route": args.experiment_route,
        "experiment_s": args.experiment_seconds, "experiment_users": args.experiment_users,
        "feedback_share": args.feedback_share, "weak_model": args.weak_model,
        "locust_workers": args.locust_workers, "budget_ms": args.budget_ms}.items() if v is not None}
    cfg = RunConfig(
        url=args.url, config=args.config, store_home=args.store, steps=args.steps, step_s=args.step_seconds,
        variants=args.variants.split(",") if args.variants else None, split=not args.no_split, slo_ms=args.slo_ms,
        bad_share=args.bad_share, scrape_interval_s=args.scrape_interval, experiment=not args.no_experiment,
        policies=args.policies,
        max_total_s=args.max_seconds, reports_dir=args.reports_dir, name=args.name, seed=args.seed, **given,
    )
    if cfg.max_total_s < cfg.step_s + 10:
        print(f"effnet loadtest: error: --max-seconds {cfg.max_total_s:g} leaves no time for one step of "
              f"--step-seconds {cfg.step_s:g} (give at least {cfg.step_s + 10:g})", file=sys.stderr)
        return 2
    if cfg.url and (args.config or args.store):
        print("effnet loadtest: note: --config and --store describe the service that a run starts itself; with --url "
              "the running service's own are used" + (" (--store still locates the checkpoints for the offline "
                                                      "evaluation)" if args.store else ""), file=sys.stderr)
    out = execute(cfg, log=lambda msg: print(msg, flush=True))
    print(f"\nreport: {out / 'report.md'}\nplot:   {out / 'tradeoff.png'}\ndata:   {out / 'results.json'}")
    summary_path = out / "report.md"
    text = summary_path.read_text()
    section = text.split("## Variants", 1)[-1].split("## Per step", 1)[0]
    print("\n## Variants" + section.rstrip())
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from loadtest.report import compare, load, render

    if args.compare:
        print(compare(args.compare[0], args.compare[1], args.reports_dir), end="")
        return 0
    if not args.run:
        print("give a run (folder or name under reports/) or --compare A B", file=sys.stderr)
        return 2
    folder, _ = load(args.run, args.reports_dir)
    render(folder)
    if args.publish:
        from loadtest.report import publish

        md, png = publish(folder, args.publish, stem=f"loadtest-{Path(folder).name}")
        print(f"published {md} and {png}")
        return 0
    print((folder / "report.md").read_text(), end="")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser(
        "loadtest", help="load-test the service with Locust while Prometheus watches; write reports/<run>/",
        description="Start the service (or target --url), start a private Prometheus, drive Locust headless through "
                    "a step-load profile per variant and through each split, then run an A/B experiment with "
                    "feedback on the fashion route (control b0 against a deliberately weaker variant, trained once "
                    "into the store) until it is decided, and write report.md, tradeoff.png and results.json under "
                    "reports/<run>/. Everything started is stopped again, also on Ctrl-C.",
    )
    p.add_argument("--url", help="a running service on 127.0.0.1 (default: start `effnet serve`)")
    p.add_argument("--config", help="serving configuration for the started service (default: service/config.yaml)")
    p.add_argument("--store", type=existing_dir("store"), help="BENTOML_HOME holding the models (default: $BENTOML_HOME or ~/bentoml)")
    p.add_argument("--steps", type=int_list(1, 256, "step (concurrent users)"), default=[1, 4, 16, 32], help="concurrent users per step (default 1,4,16,32)")
    p.add_argument("--step-seconds", type=bounded(float, 1, 600, " s"), default=15.0, help="load time per step (default 15)")
    p.add_argument("--variants", help="comma-separated variants to load explicitly (default: all served)")
    p.add_argument("--no-split", action="store_true", help="skip the split phases")
    p.add_argument("--slo-ms", type=bounded(float, 1, 60000, " ms"), default=250.0, help="p99 objective for the best throughput (default 250)")
    p.add_argument("--bad-share", type=bounded(float, 0, 0.5), default=0.02, help="share of broken uploads (default 0.02)")
    p.add_argument("--fashion-images", type=bounded(int, 1, 10000), help="Fashion-MNIST test images sent (default: all 10000)")
    e = p.add_argument_group("experiment phase", "split traffic with POST /feedback until the weak variant is decided; "
                             "with --url, on a route that already runs an experiment ($EFFNET_ADMIN_TOKEN is sent "
                             "as the bearer token where the server asks for one)")
    e.add_argument("--no-experiment", action="store_true", help="skip the experiment phase")
    e.add_argument("--experiment-route", help="the route of the experiment (default fashion)")
    e.add_argument("--experiment-seconds", type=bounded(float, 5, 600, " s"), help="its longest run; it stops once decided (default 30)")
    e.add_argument("--experiment-users", type=bounded(int, 1, 256), help="its concurrent users (default 8)")
    e.add_argument("--feedback-share", type=bounded(float, 0, 1), help="share of labelled answers given feedback (default 1.0)")
    e.add_argument("--weak-model", help="store name of the weak variant; trained once if absent (default compact-weak-fashion-mnist)")
    g = p.add_argument_group("policy phases", "the budget and cascade policies on two routes the run adds over the "
                             "fashion variants (fashion-budget, fashion-cascade with thresholds from `effnet cascade "
                             "fit`), at the same user counts as the variants; opt-in: they add two phases of steps")
    g.add_argument("--policies", action=argparse.BooleanOptionalAction, default=False,
                   help="add the policy phases (raise --max-seconds to fit them; `make loadtest` does both)")
    g.add_argument("--budget-ms", type=bounded(float, 1, 10000, " ms"),
                   help="X-Latency-Budget-Ms of every budget-route request (default 250)")
    p.add_argument("--locust-workers", type=bounded(int, 0, 64), metavar="N",
                   help="run Locust distributed: a master and N worker processes per step, for more load than one "
                   "process makes (default 0: one process; docs/loadtest.md runs workers on other machines)")
    p.add_argument("--scrape-interval", type=bounded(float, 0.1, 60, " s"), default=1.0, help="Prometheus scrape interval, s (default 1)")
    p.add_argument("--max-seconds", type=bounded(float, 11, 3600, " s"), default=570.0, help="hard bound on the whole run; steps that do not fit are skipped and noted (default 570)")
    p.add_argument("--reports-dir", default="reports", help="folder of the runs' reports (default: %(default)s)")
    p.add_argument("--name", type=_run_name, help="run name, a folder under --reports-dir (default: UTC date-time)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the image order, broken uploads and client ids, so runs compare (default 0)")
    p.set_defaults(func=cmd_loadtest)

    r = sub.add_parser("report", help="re-render a load-test report, or compare two runs (--compare A B)",
                       description="Render report.md and tradeoff.png of a load-test run again from its results.json "
                       "and print the report, or print two runs side by side (--compare A B).")
    r.add_argument("run", nargs="?", help="run folder or name under reports/")
    r.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two runs side by side")
    r.add_argument("--publish", metavar="DIR", help="also copy report.md and tradeoff.png into DIR as loadtest-RUN.md (e.g. benchmarks/results/DATE-HOST)")
    r.add_argument("--reports-dir", default="reports", help="folder of the runs' reports (default: %(default)s)")
    r.set_defaults(func=cmd_report)
