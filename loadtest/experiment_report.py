"""The experiment phase in the report: pure functions of results.json (experiment.py wrote the raw parts).

Per variant: the server's online accuracy (GET /experiments: the feedback it committed) with its 95%
interval, beside the offline engine's accuracy on the very answers that got feedback, and the counts the
load generator saw acknowledged; then the decision: when the weak variant was told apart from the control,
after how many labelled answers and requests, and how many the sequential test predicts for the offline
accuracies.
"""
from __future__ import annotations

from collections import Counter

from .images import dataset_for, image_set


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _tallies(steps: list[dict]) -> dict:
    """The experiment steps' Locust tallies: per variant the feedback the server acknowledged to Locust."""
    variants: dict[str, dict] = {}
    for step in steps:
        tally = step.get("tally") or {}
        for name, v in (tally.get("variants") or {}).items():
            agg = variants.setdefault(name, {"feedback": 0, "feedback_correct": 0, "by_image": Counter()})
            agg["feedback"] += v.get("feedback", 0)
            agg["feedback_correct"] += v.get("feedback_correct", 0)
            for image_id, preds in (v.get("feedback_by_image") or {}).items():
                for pred, n in preds.items():
                    agg["by_image"][(image_id, int(pred))] += n
    return variants


def offline_on(by_image: Counter, offline_top1: dict, labels: dict) -> float | None:
    """Accuracy of the offline engine's top-1 on the answers in `by_image` ((image id, top-1) -> count)."""
    if not isinstance(offline_top1, dict) or "error" in offline_top1:
        return None
    n = correct = 0
    for (image_id, _), k in by_image.items():
        if image_id in offline_top1 and labels.get(image_id):
            n += k
            correct += k * (offline_top1[image_id] in labels[image_id])
    return correct / n if n else None


def decision_point(trajectory: list[dict], variant: str) -> dict | None:
    """The first look at which `variant`'s status against the control was no longer `collecting`."""
    for look in trajectory:
        v = look["variants"].get(variant) or {}
        if v.get("status") not in (None, "collecting", "control"):
            control = next((x for x in look["variants"].values() if x.get("status") == "control"), {})
            return {"t_s": look["t_s"], "status": v["status"], "requests": look["requests"],
                    "labelled": look["labelled"], "variant_labelled": v["labelled"],
                    "control_labelled": control.get("labelled")}
    return None


def summarise_experiment(results: dict) -> dict | None:
    """The experiment section of the summary, or None where no experiment phase ran."""
    info = results.get("experiment") or {}
    final = info.get("final")
    if not final:
        return None
    from service.experiments.stats import predicted_sample_size

    n_fashion = (results.get("config") or {}).get("fashion_images", 200)
    served = results.get("variants") or {}
    steps = [s for s in results.get("steps") or [] if s["kind"] == "experiment"]
    tallies = _tallies(steps)
    rows = []
    distinct: set[str] = set()
    for v in final.get("variants") or []:
        name, role = v["variant"], v["role"]
        meta = served.get(name) or {}
        ds = dataset_for(meta.get("dataset"), meta.get("num_classes"), meta.get("route"))
        labels = {im.id: im.labels for im in image_set(ds, n_fashion)}
        # A shadow's feedback is joined when its mirrored answer lands, often after the verdict: the server's
        # counts are its only record.
        t = tallies.get(name) if role != "shadow" else None
        if t:
            distinct |= {i for i, _ in t["by_image"]}
        vs = v.get("vs_control") or {}
        rows.append({
            "variant": name, "role": role, "requests": v["requests"], "labelled": v["labelled"],
            "correct": v["correct"], "accuracy": v["accuracy"], "accuracy_95": v.get("accuracy_95"),
            "acknowledged": t["feedback"] if t else None,
            "acknowledged_correct": t["feedback_correct"] if t else None,
            # the offline engine on the very answers that got feedback (a shadow's mirrored images are not known)
            "offline_same_images": offline_on(t["by_image"], (results.get("offline_top1") or {}).get(name), labels)
            if t else None,
            "distinct_images": len({i for i, _ in t["by_image"]}) if t else None,
            "status": vs.get("status", "control" if role == "control" else None),
            "difference": vs.get("difference"), "low": vs.get("low"), "high": vs.get("high"),
            "p_value": vs.get("p_value"), "mde": vs.get("mde"),
        })
    weak = info.get("weak")
    by_name = {r["variant"]: r for r in rows if r["role"] != "shadow"}
    control = next((r for r in rows if r["role"] == "control"), None)
    predicted = None
    if control and weak in by_name:
        pc, pw = control["offline_same_images"], by_name[weak]["offline_same_images"]
        if pc is not None and pw is not None and pc != pw:
            predicted = predicted_sample_size(pc, pw)
    trajectory = info.get("trajectory") or []
    return {
        "route": info.get("route"), "control": final.get("control"), "weak": weak, "users": info.get("users"),
        "feedback_share": info.get("feedback_share"), "weak_train_s": info.get("weak_train_s"),
        "max_s": info.get("max_s"), "ran_s": sum((s.get("cpu") or {}).get("wall_s", 0) for s in steps),
        "route_status": final.get("status"), "variants": rows, "distinct_images": len(distinct),
        "decision": decision_point(trajectory, weak),
        "weak_detected_worse": (by_name.get(weak) or {}).get("status") == "worse",
        "predicted_labelled_per_arm": predicted, "looks": len(trajectory),
    }


def markdown_lines(e: dict) -> list[str]:
    """The report's "Experiment" section."""
    L = ["", f"## Experiment on route {e['route']} (control {e['control']})", "",
         f"Split traffic from {e['users']} users with `POST /feedback` for {_pct(e['feedback_share'])} of the labelled "
         f"answers; `{e['weak']}` is a deliberately weaker variant (compact trained on a tenth of an epoch"
         + (f", {e['weak_train_s']:.0f} s to train" if e.get("weak_train_s") else "") + "). "
         f"The phase ran {e['ran_s']:.0f} s (at most {e['max_s']:.0f}) and looked at `GET /experiments/{e['route']}` "
         f"{e['looks']} times; {e['distinct_images']} distinct images got feedback.", ""]
    d = e["decision"]
    if d:
        L.append(f"**Decision**: `{e['weak']}` is **{d['status']}** than `{e['control']}` after {d['labelled']} labelled "
                 f"answers on the route ({d['variant_labelled']} of `{e['weak']}`, {d['control_labelled']} of the control; "
                 f"{d['requests']} requests), {d['t_s']:.0f} s into the phase.")
    else:
        L.append(f"**Decision**: none for `{e['weak']}` within the phase.")
    if e["predicted_labelled_per_arm"]:
        L.append(f"The sequential test predicts a decision at about {e['predicted_labelled_per_arm']} labelled answers "
                 "per arm for the two variants' offline accuracies on these images.")
    L.append(f"Route status at the end: {e['route_status']}.")
    L += ["", "| variant | role | requests | labelled (acknowledged to Locust) | online accuracy [95%] | "
          "offline, same answers | distinct images | vs control [always-valid 95%] | status |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in e["variants"]:
        lo, hi = r["accuracy_95"] or (None, None)
        interval = f" [{_pct(lo)}, {_pct(hi)}]" if lo is not None else ""
        diff = (f"{100 * r['difference']:+.1f} [{100 * r['low']:+.1f}, {100 * r['high']:+.1f}] pts"
                if r["difference"] is not None and r["low"] is not None else "-")
        L.append(f"| {r['variant']} | {r['role']} | {r['requests']} | {r['labelled']} ({r['acknowledged'] if r['acknowledged'] is not None else '-'}) | "
                 f"{_pct(r['accuracy'])}{interval} | {_pct(r['offline_same_images'])} | "
                 f"{r['distinct_images'] if r['distinct_images'] is not None else '-'} | {diff} | {r['status'] or '-'} |")
    L += ["", "Online accuracy: the feedback the server committed, as `GET /experiments` reports it (Wilson interval); "
          "offline: the same checkpoints run outside the service on the images of the answers that got feedback. "
          "Requests count every recorded answer of the route in this run, the earlier phases' included."]
    return L
