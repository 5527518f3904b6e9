"""Turn a run's raw material (Locust CSVs and tallies, Prometheus windows, offline top-1) into figures.

Nothing here talks to a server: `summarise(results)` is a pure function of results.json, so a report
can be re-rendered or re-analysed later (`effnet report RUN`).
"""
from __future__ import annotations

from collections import Counter

from .experiment_report import summarise_experiment
from .images import dataset_for, image_set

# Locust rows that are not classification traffic.
_META_ROWS = ("Aggregated", "GET /variants", "GET /routes")
# Client-side and server-side latency differ by the client's own time (Locust shares the 2 cores);
# above this much they disagree "largely" and the report says so.
LATENCY_TOLERANCE_MS = 25.0
LATENCY_TOLERANCE_REL = 0.5


def _ms(seconds):
    return None if seconds is None else round(seconds * 1000, 1)


def _cfg(results, key, default=None):
    return (results.get("config") or {}).get(key, default)


# Locust rows of the feedback that the experiment phase sends (`feedback <variant>`).
FEEDBACK_ROW = "feedback "


def locust_classify_count(stats: dict) -> int:
    return sum(r["count"] for name, r in stats.items()
               if name not in _META_ROWS and not name.startswith(FEEDBACK_ROW))


def latency_disagreement(prom_ms, locust_ms) -> bool:
    if prom_ms is None or locust_ms is None:
        return False
    return abs(prom_ms - locust_ms) > max(LATENCY_TOLERANCE_MS, LATENCY_TOLERANCE_REL * max(prom_ms, locust_ms))


def step_row(step: dict, variant: str | None) -> dict:
    """One step of one variant: Prometheus's and Locust's view side by side."""
    p = (step.get("prometheus") or {}).get(variant or "all") or {}
    lat = p.get("latency_s") or {}
    stats = step.get("stats") or {}
    if step["kind"] == "variant":
        lrow = stats.get(f"classify {variant}") or {}
    else:
        lrow = stats.get(f"split {step['route']}:{variant}") or {}
    wall = (step.get("cpu") or {}).get("wall_s") or 0
    cores = (step.get("cpu") or {}).get("cores") or 1
    cpu = step.get("cpu") or {}
    return {
        "phase": step["phase"], "users": step["users"],
        "requests": p.get("requests"), "ok": p.get("ok"), "refused": p.get("refused"), "errors": p.get("errors"),
        "error_rate": p.get("error_rate"),
        "by_status": p.get("by_status"),
        "throughput": p.get("throughput"),
        "p50_ms": _ms(lat.get("p50")), "p95_ms": _ms(lat.get("p95")), "p99_ms": _ms(lat.get("p99")),
        "inference_p50_ms": _ms((p.get("inference_s") or {}).get("p50")),
        "queue_wait_p50_ms": _ms((p.get("queue_wait_s") or {}).get("p50")),
        "batch_size_mean": p.get("batch_size_mean"),
        "locust": {"count": lrow.get("count"), "failures": lrow.get("failures"), "rps": lrow.get("rps"),
                   "p50_ms": lrow.get("p50_ms"), "p95_ms": lrow.get("p95_ms"), "p99_ms": lrow.get("p99_ms")},
        # Shares of the machine (all cores) during the step: the load generator shares the CPU.
        "cpu_share": {"service": cpu.get("service_s", 0) / (wall * cores) if wall and cpu.get("service_processes") else None,
                      "locust": cpu.get("locust_s", 0) / (wall * cores) if wall else None,
                      # everything busy on the machine, other people's work included
                      "machine": cpu.get("machine_busy_s") / (wall * cores) if wall and cpu.get("machine_busy_s") else None},
    }


def _accuracy(variant: str, steps: list[dict], offline_top1: dict, images) -> dict:
    by_image: Counter = Counter()  # (image id, answered top-1) -> count
    for step in steps:
        v = ((step.get("tally") or {}).get("variants") or {}).get(variant) or {}
        for image_id, preds in (v.get("by_image") or {}).items():
            for pred, n in preds.items():
                by_image[(image_id, int(pred))] += n
    labels = {im.id: im.labels for im in images}
    ref = offline_top1 if isinstance(offline_top1, dict) and "error" not in offline_top1 else None
    answered = labelled = correct = offline_correct = mismatched = 0
    mismatched_images = set()
    for (image_id, pred), n in by_image.items():
        answered += n
        if ref is not None and image_id in ref and ref[image_id] != pred:
            mismatched += n
            mismatched_images.add(image_id)
        if labels.get(image_id):
            labelled += n
            correct += n * (pred in labels[image_id])
            if ref is not None and image_id in ref:
                offline_correct += n * (ref[image_id] in labels[image_id])
    distinct = {i for i, _ in by_image}
    return {
        "answers": answered, "labelled": labelled, "correct": correct,
        "under_load": correct / labelled if labelled else None,
        "offline_same_images": offline_correct / labelled if labelled and ref is not None else None,
        "offline_error": offline_top1.get("error") if isinstance(offline_top1, dict) else None,
        "distinct_images": len(distinct),
        "answers_differing_from_offline": mismatched if ref is not None else None,
        "images_differing_from_offline": sorted(mismatched_images)[:20],
    }


def _best_within_slo(rows: list[dict], slo_ms: float, max_error_rate: float) -> dict | None:
    best = None
    for r in rows:
        p99 = r["p99_ms"] if r["p99_ms"] is not None else r["locust"]["p99_ms"]
        thr = r["throughput"] if r["throughput"] is not None else r["locust"]["rps"]
        if p99 is None or thr is None or p99 > slo_ms or (r["error_rate"] or 0) > max_error_rate:
            continue
        if best is None or thr > best["throughput"]:
            best = {"throughput": thr, "users": r["users"], "p99_ms": p99}
    return best


BUDGETS_MS = (100, 250, 500, 1000)
ACCURACY_TIE = 0.01


def picks(variants: dict, budgets=BUDGETS_MS, max_error_rate: float = 0.01) -> dict[str, list[dict]]:
    """Per route and p99 budget: the most accurate variant that met the budget at some step, and the
    most traffic it carried within it (accuracies within a point are a tie, won by throughput)."""
    out: dict[str, list[dict]] = {}
    for route in sorted({v["route"] for v in variants.values()}):
        rows = []
        for budget in budgets:
            fits = []
            for name, v in variants.items():
                fit = _best_within_slo(v["steps"], budget, max_error_rate) if v["route"] == route else None
                acc = v["accuracy"]["under_load"]
                if fit is not None and acc is not None:
                    fits.append({"variant": name, "accuracy": acc, **fit})
            best = None
            if fits:
                # Accuracies within ACCURACY_TIE of the best are a tie (a few hundred labelled images cannot
                # tell them apart): among those, the one that carried the most traffic.
                top = max(f["accuracy"] for f in fits)
                best = max((f for f in fits if f["accuracy"] >= top - ACCURACY_TIE), key=lambda f: f["throughput"])
            rows.append({"budget_ms": budget, **(best or {"variant": None})})
        out[route] = rows
    return out


def _errors(steps: list[dict]) -> dict[str, int]:
    out: Counter = Counter()
    for step in steps:
        for name, kinds in ((step.get("tally") or {}).get("errors") or {}).items():
            for kind, n in kinds.items():
                out[kind] += n
    return dict(out)


def summarise(results: dict, cfg=None) -> dict:
    slo = _cfg(results, "slo_ms", 250.0)
    max_err = _cfg(results, "max_error_rate", 0.01)
    n_fashion = _cfg(results, "fashion_images", 200)
    variants = results.get("variants") or {}
    steps = results.get("steps") or []
    summary: dict = {"variants": {}, "splits": {}, "cross_checks": [], "disagreements": [], "bad_inputs": {}}
    for name, v in variants.items():
        own = [s for s in steps if s["kind"] == "variant" and s["phase"] == name]
        split_steps = [s for s in steps if s["kind"] in ("split", "experiment") and
                       name in ((s.get("tally") or {}).get("variants") or {})]
        ds = dataset_for(v.get("dataset"), v.get("num_classes"), v.get("route"))
        images = image_set(ds, n_fashion)
        rows = [step_row(s, name) for s in own]
        summary["variants"][name] = {
            "route": v.get("route"), "model": v.get("model"), "dataset": v.get("dataset"), "images": ds,
            "params": v.get("params"), "macs": v.get("macs"), "offline_top1_manifest": v.get("top1"),
            "device": v.get("device"),
            "accuracy": _accuracy(name, own + split_steps, (results.get("offline_top1") or {}).get(name) or {}, images),
            "steps": rows,
            "best_within_slo": _best_within_slo(rows, slo, max_err),
            "max_throughput": max((r["throughput"] or 0 for r in rows), default=None),
            "errors": _errors(own),
        }
    for step in steps:
        total_prom = ((step.get("prometheus") or {}).get("all") or {}).get("requests")
        bento = ((step.get("prometheus") or {}).get("all") or {}).get("bentoml_requests")
        total_locust = locust_classify_count(step.get("stats") or {})
        check = {"phase": step["phase"], "users": step["users"], "locust": total_locust, "prometheus": total_prom,
                 "bentoml": bento}
        # Locust drains in-flight requests before it stops (--stop-timeout), so the counts must be equal.
        check["agree"] = total_prom is not None and abs(total_prom - total_locust) < 0.5
        summary["cross_checks"].append(check)
        if not check["agree"]:
            summary["disagreements"].append(
                f"{step['phase']} x{step['users']}: Locust sent {total_locust} classify requests, "
                f"Prometheus counted {total_prom}")
        for v in variants:
            if step["kind"] == "variant" and step["phase"] != v:
                continue
            if v not in (step.get("prometheus") or {}):
                continue
            r = step_row(step, v)
            for q in ("p50_ms", "p95_ms"):
                if latency_disagreement(r[q], r["locust"][q]):
                    summary["disagreements"].append(
                        f"{step['phase']} x{step['users']} {v}: {q[:-3]} Prometheus {r[q]} ms (server) vs "
                        f"Locust {r['locust'][q]} ms (client)")
        for kind, counts in ((step.get("tally") or {}).get("bad_inputs") or {}).items():
            agg = summary["bad_inputs"].setdefault(kind, Counter())
            agg.update(counts)
    summary["bad_inputs"] = {k: dict(c) for k, c in summary["bad_inputs"].items()}
    for step in (s for s in steps if s["kind"] == "split"):
        route = step["route"]
        sp = summary["splits"].setdefault(route, {"weights": (results.get("routes") or {}).get(route, {}).get("weights"),
                                                  "answers": Counter(), "prometheus_assignments": Counter(),
                                                  "shadow": Counter(), "sticky_violations": 0, "clients": 0,
                                                  "steps": []})
        tally = step.get("tally") or {}
        sp["answers"].update((tally.get("split") or {}).get(route) or {})
        sp["sticky_violations"] += tally.get("sticky_violations", 0)
        sp["clients"] = max(sp["clients"], tally.get("clients", 0))
        ps = ((step.get("prometheus") or {}).get("split") or {})
        sp["prometheus_assignments"].update(ps.get("assignments") or {})
        shadow = ps.get("shadow") or {}
        sp["shadow"].update({k: v for k, v in (shadow.get("by") or {}).items()})
        sp["shadow_metric"] = shadow.get("metric")
        sp["steps"].append(step_row(step, None))
    summary["picks"] = picks(summary["variants"], max_error_rate=max_err)
    summary["experiment"] = summarise_experiment(results)
    from .policy_report import summarise_policies  # it builds on this module's rows

    summary["policies"] = summarise_policies(results, summary["variants"])
    for route, sp in summary["splits"].items():
        total = sum(sp["answers"].values())
        sp["shares"] = {v: n / total for v, n in sp["answers"].items()} if total else {}
        by = sp.pop("shadow")
        yes, no = by.get("agree", 0), by.get("disagree", 0)
        sp["shadow"] = {"by": dict(by), "compared": yes + no, "agreement": yes / (yes + no) if yes + no else None}
        sp["answers"], sp["prometheus_assignments"] = dict(sp["answers"]), dict(sp["prometheus_assignments"])
    return summary
