"""`effnet loadtest` (step-load run with Locust and Prometheus) and `effnet report` (render, compare)."""
from __future__ import annotations

import argparse
import sys


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 or v > 256 for v in values):
        raise argparse.ArgumentTypeError("each step is 1..256 concurrent users")
    return values


def cmd_loadtest(args: argparse.Namespace) -> int:
    from .run import RunConfig, execute

    cfg = RunConfig(
        url=args.url, config=args.config, store_home=args.store, steps=args.steps, step_s=args.step_seconds,
        variants=args.variants.split(",") if args.variants else None, split=not args.no_split, slo_ms=args.slo_ms,
        bad_share=args.bad_share, fashion_images=args.fashion_images, scrape_interval_s=args.scrape_interval,
        max_total_s=args.max_seconds, reports_dir=args.reports_dir, name=args.name, seed=args.seed,
    )
    if not 1 <= cfg.step_s <= 600:
        print("--step-seconds must be 1..600", file=sys.stderr)
        return 2
    if not 0 <= cfg.bad_share <= 0.5:
        print("--bad-share must be 0..0.5", file=sys.stderr)
        return 2
    out = execute(cfg, log=lambda msg: print(msg, flush=True))
    print(f"\nreport: {out / 'report.md'}\nplot:   {out / 'tradeoff.png'}\ndata:   {out / 'results.json'}")
    summary_path = out / "report.md"
    text = summary_path.read_text()
    section = text.split("## Variants", 1)[-1].split("## Per step", 1)[0]
    print("\n## Variants" + section.rstrip())
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import compare, load, render

    if args.compare:
        print(compare(args.compare[0], args.compare[1], args.reports_dir), end="")
        return 0
    if not args.run:
        print("give a run (folder or name under reports/) or --compare A B", file=sys.stderr)
        return 2
    folder, _ = load(args.run, args.reports_dir)
    render(folder)
    if args.publish:
        from .report import publish

        md, png = publish(folder, args.publish)
        print(f"published {md} and {png}")
        return 0
    print((folder / "report.md").read_text(), end="")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser(
        "loadtest", help="load-test the service with Locust while Prometheus watches; write reports/<run>/",
        description="Start the service (or target --url), start a private Prometheus, drive Locust headless through "
                    "a step-load profile per variant and through each split, then write report.md, tradeoff.png "
                    "and results.json under reports/<run>/. Everything started is stopped again, also on Ctrl-C.",
    )
    p.add_argument("--url", help="a running service on 127.0.0.1 (default: start `effnet serve`)")
    p.add_argument("--config", help="serving configuration for the started service (default: service/config.yaml)")
    p.add_argument("--store", help="BENTOML_HOME holding the models (default: $BENTOML_HOME or ~/bentoml)")
    p.add_argument("--steps", type=_int_list, default=[1, 4, 16, 32], help="concurrent users per step (default 1,4,16,32)")
    p.add_argument("--step-seconds", type=float, default=15.0, help="load time per step (default 15)")
    p.add_argument("--variants", help="comma-separated variants to load explicitly (default: all served)")
    p.add_argument("--no-split", action="store_true", help="skip the split phases")
    p.add_argument("--slo-ms", type=float, default=250.0, help="p99 objective for the best throughput (default 250)")
    p.add_argument("--bad-share", type=float, default=0.02, help="share of broken uploads (default 0.02)")
    p.add_argument("--fashion-images", type=int, default=200, help="Fashion-MNIST test images sent (default 200)")
    p.add_argument("--scrape-interval", type=float, default=1.0, help="Prometheus scrape interval, s (default 1)")
    p.add_argument("--max-seconds", type=float, default=570.0, help="hard bound on the whole run; steps that do not fit are skipped and noted (default 570)")
    p.add_argument("--reports-dir", default="reports")
    p.add_argument("--name", help="run name (default: UTC date-time)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_loadtest)

    r = sub.add_parser("report", help="re-render a load-test report, or compare two runs (--compare A B)")
    r.add_argument("run", nargs="?", help="run folder or name under reports/")
    r.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two runs side by side")
    r.add_argument("--publish", metavar="DIR", help="also copy report.md and tradeoff.png into DIR (e.g. docs)")
    r.add_argument("--reports-dir", default="reports")
    r.set_defaults(func=cmd_report)
