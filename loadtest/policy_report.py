"""The policy routes beside the fixed variants: figures, the two verdicts, and the cascade's panel of the plot.

Pure functions of results.json (and the variants' summary), like analysis.py. The verdicts:

- cascade: it beats every single variant of its route when, for each of them, its accuracy under load is
  higher (by more than `ACCURACY_TIE`) and its throughput at every shared user count is at least
  `THROUGHPUT_TIE` of the variant's (equal throughput, within the noise of one short step);
- budget: at some user count its p99 stayed within the budget while every fixed variant of equal or
  better accuracy (within `ACCURACY_TIE`) missed it.
"""
from __future__ import annotations

from .analysis import ACCURACY_TIE, _best_within_slo, step_row

THROUGHPUT_TIE = 0.95


def _row(step: dict) -> dict:
    row = step_row(step, None)  # Prometheus's figures of the whole service: the step loads this route alone
    lrow = (step.get("stats") or {}).get(f"policy {step['route']}") or {}
    row["locust"] = {k: lrow.get(k) for k in ("count", "failures", "rps", "p50_ms", "p95_ms", "p99_ms")}
    return row


def _p99(row: dict):
    return row["p99_ms"] if row["p99_ms"] is not None else row["locust"]["p99_ms"]


def _throughput(row: dict):
    return row["throughput"] if row["throughput"] is not None else row["locust"]["rps"]


def summarise_policies(results: dict, variants: dict) -> dict:
    """{route: figures} for each policy route that had steps, and {"verdicts": ...}; {} without any."""
    cfg = results.get("config") or {}
    slo, max_err = cfg.get("slo_ms", 250.0), cfg.get("max_error_rate", 0.01)
    routes: dict = {}
    for step in (s for s in results.get("steps") or [] if s["kind"] == "policy"):
        info = (results.get("routes") or {}).get(step["route"]) or {}
        policy = next(iter(info.get("policy") or {}), None)
        r = routes.setdefault(step["route"], {"policy": policy, "variants": list(info.get("weights") or {}),
                                              "steps": [], "answers": 0, "labelled": 0, "correct": 0,
                                              "budget_missed": 0, "answered_by": {}, "stages_run": {}})
        tally = ((step.get("tally") or {}).get("policy") or {}).get(step["route"]) or {}
        row = _row(step)
        row.update(budget_missed=tally.get("budget_missed", 0), answers=tally.get("answers", 0))
        r["steps"].append(row)
        for k in ("answers", "labelled", "correct", "budget_missed"):
            r[k] += tally.get(k, 0)
        for k in ("answered_by", "stages_run"):
            for v, n in (tally.get(k) or {}).items():
                r[k][v] = r[k].get(v, 0) + n
    for name, r in routes.items():
        r["accuracy"] = r["correct"] / r["labelled"] if r["labelled"] else None
        r["miss_rate"] = r["budget_missed"] / r["answers"] if r["answers"] else None
        r["best_within_slo"] = _best_within_slo(r["steps"], slo, max_err)
        macs = {v: (variants.get(v) or {}).get("macs") or 0 for v in r["stages_run"]}
        r["mean_macs"] = (sum(macs[v] * n for v, n in r["stages_run"].items()) / r["answers"]
                          if r["policy"] == "cascade" and r["answers"] else None)
        if r["policy"] == "budget":
            r["budget_ms"] = cfg.get("budget_ms")
    if not routes:
        return {}
    return {"routes": routes, "verdicts": verdicts(routes, variants)}


def _fixed(variants: dict, names: list[str]) -> dict:
    return {v: variants[v] for v in names if v in variants and variants[v]["accuracy"]["under_load"] is not None}


def cascade_verdict(r: dict, variants: dict) -> dict:
    """Does the cascade beat every single variant of its route on accuracy at equal throughput?"""
    acc = r["accuracy"]
    by_users = {row["users"]: _throughput(row) for row in r["steps"]}
    lost = []
    for name, v in _fixed(variants, r["variants"]).items():
        theirs = v["accuracy"]["under_load"]
        if acc is None or acc <= theirs + ACCURACY_TIE:
            lost.append(f"{name} is as accurate ({100 * theirs:.1f}% against {_pct(acc)})")
            continue
        slower = [u for u in sorted(by_users) for row in v["steps"] if row["users"] == u and by_users[u] is not None
                  and _throughput(row) and by_users[u] < THROUGHPUT_TIE * _throughput(row)]
        if slower:
            lost.append(f"{name} carries more traffic at {', '.join(map(str, slower))} users")
    return {"beats_every_variant": acc is not None and not lost, "why_not": lost}


def budget_verdict(r: dict, variants: dict) -> dict:
    """At which user counts the budget route kept p99 within budget while every fixed variant of equal or
    better accuracy missed it."""
    budget, acc = r.get("budget_ms"), r["accuracy"]
    rows = []
    for row in r["steps"]:
        u, p99 = row["users"], _p99(row)
        rivals = {n: v for n, v in _fixed(variants, r["variants"]).items()
                  if acc is not None and v["accuracy"]["under_load"] >= acc - ACCURACY_TIE}
        missed = {n: _p99(x) for n, v in rivals.items() for x in v["steps"] if x["users"] == u}
        within = p99 is not None and budget is not None and p99 <= budget
        rows.append({"users": u, "p99_ms": p99, "within": within, "rivals": missed,
                     "all_rivals_missed": bool(missed) and all(m is not None and m > budget for m in missed.values())})
    return {"held_where_rivals_missed": [x["users"] for x in rows if x["within"] and x["all_rivals_missed"]],
            "steps": rows}


def verdicts(routes: dict, variants: dict) -> dict:
    out = {}
    for name, r in routes.items():
        out[name] = cascade_verdict(r, variants) if r["policy"] == "cascade" else budget_verdict(r, variants)
    return out


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def _f(x, fmt="{:.0f}"):
    return "-" if x is None else fmt.format(x)


def markdown_lines(ps: dict, variants: dict, steps: list[int], cascade: dict | None = None) -> list[str]:
    """The report's "Policies" section: a row per policy route and per variant it chose among, per user count."""
    if not ps:
        return []
    L = ["", "## Policies beside the fixed variants", "",
         "p99 (server) / throughput (req/s, Prometheus) at each user count; budget misses are answers that "
         "say `budget_missed`; accuracy is on the labelled traffic of all steps.", "",
         "| route or variant | policy | accuracy under load (n) | "
         + " | ".join(f"p99 ms, req/s @{u}" for u in steps) + " | budget misses |", "|---|---|---|"
         + "---|" * (len(steps) + 1)]
    shown: list[str] = []
    for name, r in ps["routes"].items():
        by = {row["users"]: row for row in r["steps"]}
        cells = [f"**{name}**", r["policy"] + (f" ({r['budget_ms']:g} ms)" if r.get("budget_ms") else ""),
                 f"{_pct(r['accuracy'])} ({r['labelled']})"]
        cells += [f"{_f(_p99(by[u]))}, {_f(_throughput(by[u]), '{:.1f}')}" if u in by else "-" for u in steps]
        cells.append(f"{r['budget_missed']} of {r['answers']} ({_pct(r['miss_rate'])})" if r["policy"] == "budget"
                     else "-")
        L.append("| " + " | ".join(cells) + " |")
        shown += [v for v in r["variants"] if v not in shown]
    for name in shown:
        v = variants.get(name)
        if not v:
            continue
        by = {row["users"]: row for row in v["steps"]}
        cells = [name, "fixed", f"{_pct(v['accuracy']['under_load'])} ({v['accuracy']['labelled']})"]
        cells += [f"{_f(_p99(by[u]))}, {_f(_throughput(by[u]), '{:.1f}')}" if u in by else "-" for u in steps]
        L.append("| " + " | ".join(cells + ["-"]) + " |")
    for name, r in ps["routes"].items():
        chose = ", ".join(f"{v} {n}" for v, n in sorted(r["answered_by"].items()))
        L += ["", f"- {name} answered by: {chose or 'none'}"
              + (f"; stages run: {', '.join(f'{v} {n}' for v, n in sorted(r['stages_run'].items()))}; mean "
                 f"{r['mean_macs'] / 1e6:.2f} M MACs per image" if r["policy"] == "cascade" and r["mean_macs"] else "")]
        v = ps["verdicts"][name]
        if r["policy"] == "cascade":
            L.append(f"- **Does the cascade beat every single variant on accuracy at equal throughput? "
                     f"{'Yes' if v['beats_every_variant'] else 'No'}.**"
                     + ("" if v["beats_every_variant"] else " " + "; ".join(v["why_not"]) + "."))
        else:
            held = v["held_where_rivals_missed"]
            L.append(f"- **Did the budget policy keep p99 within {r.get('budget_ms'):g} ms where every fixed variant "
                     f"of equal or better accuracy missed it? "
                     + (f"Yes, at {', '.join(map(str, held))} users.**" if held else "No.**")
                     + ("" if held else " At no user count did it hold the budget while all of them missed it: "
                        + "; ".join(f"@{x['users']}: p99 {_f(x['p99_ms'])} ms, theirs "
                                    + (", ".join(f"{n} {_f(m)}" for n, m in x["rivals"].items()) or "none comparable")
                                    for x in v["steps"]) + "."))
    fit = (cascade or {}).get("fit")
    if fit:
        L.append(f"- Cascade thresholds {fit['thresholds']} from `effnet cascade fit` on the {fit['split']} split "
                 f"({fit['images']} images; expected top-1 {_pct(fit['expected']['accuracy'])}, last stage alone "
                 f"{_pct(fit['last_stage_alone']['accuracy'])})." + "".join(f" {w}" for w in fit.get("warnings") or []))
    return L


def plot_cascade(ax, ps: dict, variants: dict, cascade: dict | None) -> bool:
    """Accuracy against mean MACs per image: the cascade's offline curve over its threshold, its measured point
    under load, and the fixed variants; False when there is no cascade to draw."""
    curve = (cascade or {}).get("curve") or {}
    route = next((r for r in (ps.get("routes") or {}).values() if r["policy"] == "cascade"), None)
    if not curve.get("points") and route is None:
        return False
    if curve.get("points"):
        pts = sorted(curve["points"], key=lambda p: p["mean_cost"])
        ax.plot([p["mean_cost"] / 1e6 for p in pts], [100 * p["accuracy"] for p in pts], "-", lw=1,
                label=f"cascade offline, over the threshold ({curve['images']} images)")
    fit = (cascade or {}).get("fit")
    if fit:
        ax.scatter([fit["expected"]["mean_cost"] / 1e6], [100 * fit["expected"]["accuracy"]], marker="x",
                   label=f"fitted on {fit['split']}: expected")
    if route and route["mean_macs"] and route["accuracy"] is not None:
        ax.scatter([route["mean_macs"] / 1e6], [100 * route["accuracy"]], marker="*", s=120, zorder=4,
                   label="cascade under load")
    for name in (route or {}).get("variants") or curve.get("stages") or []:
        v = variants.get(name) or {}
        if v.get("macs") and v.get("accuracy", {}).get("under_load") is not None:
            ax.scatter([v["macs"] / 1e6], [100 * v["accuracy"]["under_load"]], color="grey", s=30, zorder=3)
            ax.annotate(name, (v["macs"] / 1e6, 100 * v["accuracy"]["under_load"]), textcoords="offset points",
                        xytext=(5, 4), fontsize=9)
    ax.set_xlabel("mean MACs per image, M (lower is better)")
    ax.set_ylabel("top-1 accuracy, %")
    ax.set_title("Cascade: offline curve and under load")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return True
