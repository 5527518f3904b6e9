"""`effnet experiment [ROUTE]`: a running server's experiments as a table, and a chart of their accuracies."""
from __future__ import annotations

import sys
from pathlib import Path

DESCRIPTION = """\
Ask a running server (GET /experiments[/ROUTE]) how its experiments stand: per variant of each route
with a `control`, the answers recorded and labelled through POST /feedback, the online accuracy with
its 95% interval, latency p50/p99, and against the control the difference with its always-valid 95%
interval, p-value, minimum detectable effect and status (collecting, better, worse, no_difference).
Looking as often as you like does not inflate false decisions (docs/api.md#experiments).

--png writes a chart of each variant's accuracy with its interval, and beside it the same over time as
feedback came in (GET /experiments/ROUTE?history=1): whether the intervals still narrow or a difference
has settled. Exit status 0, or 2 when the server cannot be reached or has no such experiment (its
message is printed)."""


def add_commands(sub) -> None:
    p = sub.add_parser("experiment", help="a running server's A/B experiments: accuracy, intervals, decisions",
                       description=DESCRIPTION, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("route", nargs="?", help="a route with a control (default: every experiment)")
    p.add_argument("--url", default="http://127.0.0.1:3000", help="the server (default %(default)s)")
    p.add_argument("--png", type=Path, help="also draw the accuracies with their intervals into this PNG")
    p.set_defaults(func=run)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def render(result: dict) -> str:
    """One experiment (GET /experiments/ROUTE's answer) as text."""
    lines = [f"route {result['route']}: control {result['control']}, status {result['status']}", "",
             f"{'variant':<10} {'role':<10} {'requests':>8} {'labelled':>8} {'accuracy [95%]':<24} "
             f"{'p50/p99 ms':<14} vs control"]
    for v in result["variants"]:
        lo, hi = v["accuracy_95"]
        acc = f"{_pct(v['accuracy'])} [{_pct(lo)}, {_pct(hi)}]" if v["labelled"] else "-"
        lat = v.get("latency_ms") or {}
        ms = f"{lat.get('p50') or 0:.1f}/{lat.get('p99') or 0:.1f}"
        vs = v.get("vs_control")
        versus = ""
        if vs:
            diff = "-" if vs["difference"] is None else f"{100 * vs['difference']:+.1f} pt"
            ci = ("" if vs["low"] is None else f" [{100 * vs['low']:+.1f}, {100 * vs['high']:+.1f}]")
            p = "" if vs["p_value"] is None else f", p {vs['p_value']:.3g}"
            mde = "" if vs["mde"] is None else f", MDE {100 * vs['mde']:.1f} pt"
            versus = f"{vs['status']}: {diff}{ci}{p}{mde}"
        lines.append(f"{v['variant']:<10} {v['role']:<10} {v['requests']:>8} {v['labelled']:>8} {acc:<24} "
                     f"{ms:<14} {versus}")
    return "\n".join(lines)


def draw(results: dict, path: Path) -> Path:
    """Each variant's accuracy with its 95% interval, one row per route; beside it its history where given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    routes = list(results.values())
    cols = 2 if any(r.get("history") for r in routes) else 1
    fig, axes = plt.subplots(len(routes), cols, figsize=(5.5 * cols, 3.6 * len(routes)), squeeze=False)
    for row, r in zip(axes, routes):
        ax = row[0]
        rows = [v for v in r["variants"] if v["labelled"]]
        names = [f"{v['variant']}\n({v['role']})" for v in rows]
        acc = [100 * v["accuracy"] for v in rows]
        err = [[100 * (v["accuracy"] - v["accuracy_95"][0]) for v in rows],
               [100 * (v["accuracy_95"][1] - v["accuracy"]) for v in rows]]
        ax.bar(names, acc, yerr=err, capsize=6, color=["#4c72b0" if v["role"] == "control" else "#dd8452"
                                                       for v in rows])
        ax.set_title(f"{r['route']}: {r['status']}")
        ax.set_ylabel("online accuracy, % (95% interval)")
        ax.set_ylim(0, 100)
        if cols == 2:
            _draw_history(row[1], r)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _draw_history(ax, result: dict) -> None:
    """Cumulative online accuracy per variant over time, its 95% interval as a band."""
    import datetime as dt

    history = result.get("history") or {}
    for name, points in history.items():
        if not points:
            continue
        t = [dt.datetime.fromtimestamp(p["t"]) for p in points]
        acc = [100 * p["accuracy"] for p in points]
        line, = ax.plot(t, acc, label=f"{name} (n={points[-1]['labelled']})", drawstyle="steps-post")
        ax.fill_between(t, [100 * p["low"] for p in points], [100 * p["high"] for p in points],
                        step="post", alpha=0.2, color=line.get_color())
    ax.set_title(f"{result['route']}: accuracy as feedback came in")
    ax.set_ylabel("cumulative online accuracy, %")
    if history:
        ax.legend(fontsize=8, loc="lower right")
    ax.figure.autofmt_xdate()


def run(args) -> int:
    import httpx

    path = f"/experiments/{args.route}" if args.route else "/experiments"
    if args.route and args.png:
        path += "?history=1"
    try:
        r = httpx.get(args.url.rstrip("/") + path, timeout=30)
    except httpx.HTTPError as e:
        print(f"effnet experiment: no answer from {args.url} ({type(e).__name__}); start the service with "
              "`make serve` or name it with --url", file=sys.stderr)
        return 2
    if r.status_code != 200:
        try:
            message = r.json().get("error", r.text)
        except ValueError:
            message = r.text[:300]
        print(f"effnet experiment: {r.status_code}: {message}", file=sys.stderr)
        return 2
    body = r.json()
    results = {args.route: body} if args.route else body["experiments"]
    if not results:
        print("no route runs an experiment: give one a `control` (routes.NAME.control in the configuration)")
    print("\n\n".join(render(x) for x in results.values()))
    if args.png and results:
        print(f"chart: {draw(results, args.png)}")
    return 0
