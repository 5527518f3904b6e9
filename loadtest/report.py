"""A run's report: `report.md` (tables), `tradeoff.png` (accuracy against latency and throughput),
from `results.json`; and `compare(A, B)`, two runs side by side.
"""
from __future__ import annotations

import json
from pathlib import Path

from .analysis import summarise
from .experiment_report import markdown_lines as experiment_lines
from .policy_report import markdown_lines as policy_lines, plot_cascade


def load(run: str | Path, reports_dir: str | Path = "reports") -> tuple[Path, dict]:
    """A run folder or name (under `reports_dir`) -> (folder, results)."""
    folder = Path(run)
    if not (folder / "results.json").is_file():
        folder = Path(reports_dir) / str(run)
    path = folder / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"no results.json in {run} (nor in {folder})")
    return folder, json.loads(path.read_text())


def _f(x, fmt="{:.1f}", none="-"):
    return none if x is None else fmt.format(x)


def _pct(x):
    return _f(None if x is None else x * 100, "{:.1f}%")


def _mega(x):
    return _f(None if not x else x / 1e6, "{:.2f}M")


def _latency_cell(row):
    return "/".join(_f(row.get(k), "{:.0f}") for k in ("p50_ms", "p95_ms", "p99_ms"))


def render(folder: Path) -> None:
    folder = Path(folder)
    results = json.loads((folder / "results.json").read_text())
    # The summary is a pure function of the raw figures: recomputed, so a re-render uses today's analysis.
    results["summary"] = summarise(results)
    (folder / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True, default=str))
    (folder / "report.md").write_text(markdown(results, plot="tradeoff.png"))
    plot(results, folder / "tradeoff.png")


def markdown(results: dict, plot: str | None = None) -> str:
    s = results["summary"]
    cfg = results.get("config") or {}
    m = results.get("machine") or {}
    ver = results.get("versions") or {}
    steps = cfg.get("steps") or []
    slo = cfg.get("slo_ms", 250)
    L = [f"# Load test {results.get('run')}", ""]
    L.append(f"- **Machine**: {m.get('cpu')}, {m.get('cores')} cores, {m.get('memory_gib')} GiB"
             f"{', GPU ' + m['gpu'] if m.get('gpu') else ', no GPU'} ({m.get('os')})")
    L.append(f"- **Date**: {results.get('date')} to {results.get('ended')}")
    L.append(f"- **Config**: steps {steps} concurrent users x {cfg.get('step_s')} s each, per variant (explicit) "
             f"and through each split; closed loop (no think time); {_pct(cfg.get('bad_share'))} broken uploads; "
             f"{cfg.get('fashion_images')} Fashion-MNIST test PNGs, scikit-image photos for ImageNet; "
             f"SLO p99 <= {slo:.0f} ms with <= {_pct(cfg.get('max_error_rate'))} errors; "
             f"Prometheus scrape every {cfg.get('scrape_interval_s')} s; service {results.get('url')}"
             + (f" (ready in {results['service_start_s']} s)" if results.get("service_start_s") else ""))
    L.append("- **Versions**: " + ", ".join(f"{k} {v}" for k, v in ver.items() if v))
    L.append("- CPU shares are of the whole machine (all cores) during each step: the service's processes, the "
             "Locust process (the load generator shares the cores), and everything busy, other work included.")
    L.append("- Latency is the service's own end-to-end histogram (`effnet_request_duration_seconds`, via "
             "PromQL over each step's window); Locust's client-side figures are in results.json and below "
             "where they disagree. The load generator runs on the same cores as the service.")
    L.append("")
    L.append("## Variants")
    L.append("")
    head = ["variant", "route", "params", "MACs", "offline top-1 (manifest)", "accuracy under load (n)",
            "offline, same images"] + [f"p50/p95/p99 ms @{u}" for u in steps] + [
            f"best req/s, p99<={slo:.0f} ms", "errors"]
    L.append("| " + " | ".join(head) + " |")
    L.append("|" + "---|" * len(head))
    for name, v in s["variants"].items():
        acc = v["accuracy"]
        by_users = {r["users"]: r for r in v["steps"]}
        best = v["best_within_slo"]
        errs = ", ".join(f"{k} {n}" for k, n in sorted(v["errors"].items())) or "0"
        cells = [f"**{name}**", v["route"] or "-", _mega(v["params"]), _mega(v["macs"]), _pct(v["offline_top1_manifest"]),
                 f"{_pct(acc['under_load'])} ({acc['labelled']})", _pct(acc["offline_same_images"])]
        cells += [_latency_cell(by_users[u]) if u in by_users else "-" for u in steps]
        cells += [f"{best['throughput']:.1f} @{best['users']}" if best else "none", errs]
        L.append("| " + " | ".join(cells) + " |")
    L.append("")
    L.append("Accuracy under load: share of labelled answers whose top-1 is the true label (explicit and split "
             "traffic); \"offline, same images\" classifies the same requests with `engines.load_engine` outside "
             "the service. MACs at the variant's served resolution (from its manifest). Errors: failed checks "
             "and non-4xx failures seen by Locust (refused broken uploads are not errors).")
    if plot:
        L += ["", f"![accuracy against latency and throughput]({plot})"]
    if s.get("picks"):
        L += ["", "## Which variant for which latency budget", "",
              "The most accurate variant of each route whose p99 stayed within the budget at some step "
              "(at most 1% errors; accuracies within one point count as a tie, won by throughput), and the "
              "most traffic it carried within it on this machine:", "",
              "| route | p99 budget | pick | accuracy under load | req/s within budget (users) |", "|---|---|---|---|---|"]
        for route, rows in s["picks"].items():
            for r in rows:
                if r.get("variant"):
                    L.append(f"| {route} | {r['budget_ms']} ms | {r['variant']} | {_pct(r['accuracy'])} | "
                             f"{r['throughput']:.1f} ({r['users']}) |")
                else:
                    L.append(f"| {route} | {r['budget_ms']} ms | none met it | - | - |")
    L += policy_lines(s.get("policies") or {}, s["variants"], steps, results.get("cascade"))
    L += ["", "## Per step", "",
          "| variant | users | req/s (Prometheus) | req/s (Locust) | p50/p95/p99 ms (server) | p50/p95/p99 ms (client) | "
          "mean batch | errors (server) | CPU: service / load generator / whole machine |",
          "|---|---|---|---|---|---|---|---|---|"]
    for name, v in s["variants"].items():
        for r in v["steps"]:
            lc = r["locust"]
            cpu = r["cpu_share"]
            L.append(f"| {name} | {r['users']} | {_f(r['throughput'])} | {_f(lc['rps'])} | {_latency_cell(r)} | "
                     f"{_latency_cell(lc)} | {_f(r['batch_size_mean'], '{:.2f}')} | {_pct(r['error_rate'])} | "
                     f"{_pct(cpu['service'])} / {_pct(cpu['locust'])} / {_pct(cpu.get('machine'))} |")
    if s.get("experiment"):
        L += experiment_lines(s["experiment"])
    if s["splits"]:
        L += ["", "## Splits and shadow", "",
              "| route | weights | realised shares (answers) | clients | sticky violations | shadow agreement |",
              "|---|---|---|---|---|---|"]
        for route, sp in s["splits"].items():
            w = ", ".join(f"{k} {float(x):.2f}" for k, x in (sp.get("weights") or {}).items())
            sh = ", ".join(f"{k} {x:.3f} ({sp['answers'][k]})" for k, x in sorted(sp["shares"].items()))
            shadow = sp["shadow"]
            agree = (f"{_pct(shadow['agreement'])} of {shadow['compared']:.0f}" if shadow["compared"] else "none compared")
            extra = {k: n for k, n in shadow["by"].items() if k not in ("agree", "disagree")}
            if extra:
                agree += " (" + ", ".join(f"{k} {n:.0f}" for k, n in extra.items()) + ")"
            L.append(f"| {route} | {w} | {sh} | {sp['clients']} | {sp['sticky_violations']} | {agree} |")
    if s["bad_inputs"]:
        L += ["", "Broken uploads (must get a 4xx): " + "; ".join(
            f"{k}: " + ", ".join(f"{a} {n}" for a, n in sorted(c.items())) for k, c in s["bad_inputs"].items())]
    if "alerts" in results:
        L += ["", "## Alerts during the run", "",
              "The private Prometheus evaluated `service/prometheus-rules.yml`. Pending: the condition held, not yet "
              "for the rule's `for:` duration, so it would fire if it lasted.", ""]
        if results["alerts"]:
            L += ["| alert | state | route | variant | first seen (s into the run) |", "|---|---|---|---|---|"]
            L += [f"| {a.get('alertname')} | {a['state']} | {a.get('route', '-')} | {a.get('variant', '-')} | "
                  f"{a['first_seen_s']} |" for a in results["alerts"]]
        else:
            L.append("None went pending or fired.")
    L += ["", "## Cross-checks", ""]
    agree = sum(c["agree"] for c in s["cross_checks"])
    L.append(f"Request counts per step, Locust (client) against Prometheus (`effnet_requests_total`): "
             f"{agree} of {len(s['cross_checks'])} steps agree exactly.")
    if s["disagreements"]:
        L += ["", "Disagreements (counts must be equal; latencies differ by more than 25 ms and 50%):", ""]
        L += [f"- {d}" for d in s["disagreements"]]
    else:
        L.append("No disagreement between Prometheus and Locust.")
    for n in results.get("notes") or []:
        L.append(f"- note: {n}")
    for n in (results.get("metric_names") or {}).get("notes") or []:
        L.append(f"- note: {n}")
    return "\n".join(L) + "\n"


def _pareto(points: list[tuple[float, float, str]], lower_x_better: bool) -> list[tuple[float, float, str]]:
    """Points not dominated: higher accuracy (y) and lower latency / higher throughput (x)."""
    front = []
    for p in points:
        dominated = any(
            (q[1] >= p[1] and (q[0] <= p[0] if lower_x_better else q[0] >= p[0])) and (q[:2] != p[:2])
            for q in points)
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: p[0])


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["summary"]
    cfg = results.get("config") or {}
    steps = cfg.get("steps") or [1]
    ref_users = steps[0]
    slo = cfg.get("slo_ms", 250)
    cascade = s.get("policies") and any(r["policy"] == "cascade" for r in s["policies"]["routes"].values()) \
        or ((results.get("cascade") or {}).get("curve") or {}).get("points")
    fig, axes = plt.subplots(1, 3 if cascade else 2, figsize=(15 if cascade else 10, 4.2), dpi=90)
    routes = sorted({v["route"] or "-" for v in s["variants"].values()})
    colors = dict(zip(routes, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    if cascade:
        plot_cascade(axes[2], s.get("policies") or {}, s["variants"], results.get("cascade"))
    for ax, kind in zip(axes, ("latency", "throughput")):
        for route in routes:
            pts = []
            for name, v in s["variants"].items():
                if (v["route"] or "-") != route:
                    continue
                acc = v["accuracy"]["under_load"]
                acc = acc if acc is not None else v["offline_top1_manifest"]
                if acc is None:
                    continue
                if kind == "latency":
                    row = next((r for r in v["steps"] if r["users"] == ref_users), None)
                    x = row and (row["p95_ms"] if row["p95_ms"] is not None else row["locust"]["p95_ms"])
                else:
                    best = v["best_within_slo"]
                    # No step within the SLO: shown hollow at its highest throughput, off the front.
                    x = best["throughput"] if best else v.get("max_throughput")
                    if not best and x:
                        ax.scatter([x], [acc * 100], facecolors="none", edgecolors=colors[route], s=40, zorder=3)
                        ax.annotate(f"{name} (p99 > SLO)", (x, acc * 100), textcoords="offset points",
                                    xytext=(5, 4), fontsize=9)
                        continue
                if x is None:
                    continue
                pts.append((x, acc * 100, name))
            # Routes label on alternate sides, so points of two routes that coincide stay readable.
            offset = (5, 4) if routes.index(route) % 2 == 0 else (5, -12)
            for x, y, name in pts:
                ax.scatter([x], [y], color=colors[route], s=40, zorder=3)
                ax.annotate(name, (x, y), textcoords="offset points", xytext=offset, fontsize=9)
            front = _pareto(pts, lower_x_better=kind == "latency")
            if len(front) > 1:
                ax.plot([p[0] for p in front], [p[1] for p in front], "--", color=colors[route], lw=1,
                        label=f"{route}: Pareto front")
            elif pts:
                ax.scatter([], [], color=colors[route], label=f"{route}")
        if kind == "latency":
            ax.set_xlabel(f"p95 latency at {ref_users} user(s), ms (lower is better)")
            ax.set_title("Accuracy vs latency")
        else:
            ax.set_xlabel(f"highest req/s with p99 <= {slo:.0f} ms (higher is better)")
            ax.set_title("Accuracy vs throughput")
        ax.set_ylabel("top-1 accuracy under load, %")
        ax.grid(alpha=0.3)
        ax.margins(x=0.2, y=0.15)  # room for the names next to the points
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    m = results.get("machine") or {}
    fig.suptitle(f"effnet load test {results.get('run')} ({str(results.get('date', ''))[:16]} UTC): "
                 f"{m.get('cpu', '')}, {m.get('cores')} cores"
                 f"{', ' + m['gpu'] if m.get('gpu') else ', CPU only'}; one point per variant "
                 f"(accuracy on each route's own task)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def publish(folder: Path, docs: Path, stem: str = "loadtest") -> tuple[Path, Path]:
    """Copy a run's report and plot into `docs` (committed, unlike reports/): `<stem>.md`, `<stem>-tradeoff.png`."""
    import shutil

    folder, docs = Path(folder), Path(docs)
    docs.mkdir(parents=True, exist_ok=True)
    png = docs / f"{stem}-tradeoff.png"
    shutil.copy(folder / "tradeoff.png", png)
    md = docs / f"{stem}.md"
    md.write_text((folder / "report.md").read_text().replace("](tradeoff.png)", f"]({png.name})"))
    return md, png


def compare(a: str | Path, b: str | Path, reports_dir: str | Path = "reports") -> str:
    """Markdown: the variants of two runs side by side, with what changed."""
    fa, ra = load(a, reports_dir)
    fb, rb = load(b, reports_dir)
    sa = ra.get("summary") or summarise(ra)
    sb = rb.get("summary") or summarise(rb)
    L = [f"# {ra.get('run')} (A) vs {rb.get('run')} (B)", "",
         f"- A: {ra.get('date')}, {(ra.get('machine') or {}).get('cpu')}, git {(ra.get('versions') or {}).get('git')}",
         f"- B: {rb.get('date')}, {(rb.get('machine') or {}).get('cpu')}, git {(rb.get('versions') or {}).get('git')}"]
    for key in ("steps", "step_s", "slo_ms", "bad_share", "fashion_images"):
        ca, cb = (ra.get("config") or {}).get(key), (rb.get("config") or {}).get(key)
        if ca != cb:
            L.append(f"- config {key}: A {ca}, B {cb}")
    L += ["", "| variant | metric | A | B | change |", "|---|---|---|---|---|"]
    names = list(dict.fromkeys(list(sa["variants"]) + list(sb["variants"])))

    def change(x, y):
        if x is None or y is None or x == 0:
            return "-"
        return f"{(y - x) / abs(x) * 100:+.1f}%"

    for name in names:
        va, vb = sa["variants"].get(name), sb["variants"].get(name)
        if va is None or vb is None:
            L.append(f"| {name} | served | {'yes' if va else 'no'} | {'yes' if vb else 'no'} | - |")
            continue
        metrics = [("accuracy under load", va["accuracy"]["under_load"], vb["accuracy"]["under_load"], _pct)]
        ua = {r["users"]: r for r in va["steps"]}
        ub = {r["users"]: r for r in vb["steps"]}
        for u in sorted(set(ua) & set(ub)):
            for q in ("p50_ms", "p99_ms"):
                metrics.append((f"{q[:-3]} ms @{u}", ua[u][q], ub[u][q], _f))
            metrics.append((f"req/s @{u}", ua[u]["throughput"], ub[u]["throughput"], _f))
        ba, bb = va["best_within_slo"], vb["best_within_slo"]
        metrics.append(("best req/s within SLO", ba and ba["throughput"], bb and bb["throughput"], _f))
        for label, x, y, fmt in metrics:
            L.append(f"| {name} | {label} | {fmt(x)} | {fmt(y)} | {change(x, y)} |")
    return "\n".join(L) + "\n"
