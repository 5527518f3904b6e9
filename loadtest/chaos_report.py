"""The chaos run's figures and verdicts, from the records alone (pure functions), and its report.

A scenario's records: every request of the load clients (stream, start, latency, status, error kind)
and every `/readyz` poll (start, status or error kind, latency), plus its marks (start, fault,
end of the fault window, end) and what the fault did. The criteria are those of the issue's "Done when":
- untouched streams: no answer other than 200, and p99 during (outside the restart seconds) and after
  within 25% or 20 ms of before;
- the touched variant: once marked down (DETECT_S after the fault) and until it answers a request again,
  every request is answered 200 (by the variant or its fallback, within WAIT_S) or refused (429/503)
  within REFUSAL_MS, and no request, even one sent before, still waits WAIT_S after that;
- recovery: the touched streams answer 200 again within RECOVERY_S of the fault (of the SIGCONT for a hang);
- `/readyz`: never 200 while a counted variant is down (after DETECT_S), and never a timeout;
- SIGTERM: no reset of a request admitted before the signal.
"""
from __future__ import annotations

import math
from pathlib import Path

DETECT_S = 2.0  # the issue: a failed variant is marked down within 2 s
REFUSAL_MS = 100.0
WAIT_S = 2.0  # a request of the touched variant that waits longer (and past its marking down) hung
RECOVERY_S = 15.0
P99_RATIO, P99_SLACK_MS = 1.25, 20.0
MIN_SAMPLES = 20  # fewer requests in a window: its p99 is not compared
RESTART_MARGIN_S = 1.0  # beyond the recovery itself, the restart seconds left out of the p99 comparison


def p99(values: list[float]) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(0.99 * len(v)) - 1))]


def window_stats(recs: list[dict]) -> dict:
    statuses: dict[str, int] = {}
    for r in recs:
        key = str(r["st"]) if r["st"] else r["e"] or "error"
        statuses[key] = statuses.get(key, 0) + 1
    lat = [r["dt"] * 1000 for r in recs]
    return {"n": len(recs), "statuses": statuses, "errors": sum(1 for r in recs if r["st"] != 200),
            "p50_ms": _round(sorted(lat)[len(lat) // 2] if lat else None), "p99_ms": _round(p99(lat)),
            "fallback": sum(1 for r in recs if r.get("assignment") == "fallback")}


def _round(x):
    return None if x is None else round(x, 1)


def recovery_s(recs: list[dict], since: float) -> float | None:
    """Seconds from `since` until the first 200 of a request started after it (None: never)."""
    ok = [r["t"] + r["dt"] for r in recs if r["t"] >= since and r["st"] == 200]
    return round(min(ok) - since, 2) if ok else None


def analyse(sc: dict) -> dict:
    """Figures and verdicts of one scenario (`sc`: its records, marks, streams and what was touched)."""
    marks, streams = sc["marks"], sc["streams"]
    detect = sc.get("detect_s", DETECT_S)
    touched, shared = set(sc.get("touched", [])), set(sc.get("shared", []))
    untouched = [s for s in streams if s not in touched | shared]
    fault = marks.get("fault", marks["start"])
    cleared = marks.get("cleared", fault)  # SIGCONT for a hang; the fault itself otherwise
    by_stream = {s: [r for r in sc["records"] if r["s"] == s] for s in streams}
    out: dict = {"streams": {}, "criteria": {}}
    recovery = {s: recovery_s(by_stream[s], cleared) for s in touched | shared}
    down_until = max((v for v in recovery.values() if v is not None), default=0.0) + cleared if recovery else fault
    if any(v is None for v in recovery.values()):
        down_until = marks["end"]
    out["recovery_s"] = recovery
    # The touched variant serves again from the first request after the fault that it answered 200: later
    # waits and refusals are its load (clients back from Retry-After at once), not its fault.
    served = [r["t"] for s in touched | shared for r in by_stream[s] if r["t"] >= fault and r["st"] == 200
              and r.get("variant", sc.get("variant")) == sc.get("variant") and r.get("assignment") != "fallback"]
    up_at = min([min(served)] if served else [], default=None)
    # The restart lasts until the variant answers again, and until a restarted replica that its route did not
    # wait for (one of two) is up and a damaged engine rebuilt behind its stand-in (marks from the scenario).
    restart_end = max(down_until, marks.get("replicas_up") or 0.0, marks.get("rebuilt") or 0.0)
    restart = (fault, restart_end + RESTART_MARGIN_S) if touched | shared else (fault, fault)
    for s, recs in by_stream.items():
        # A request still in flight at the fault belongs to the fault window, whenever it was sent.
        w = {"before": [r for r in recs if r["t"] + r["dt"] < fault],
             "during": [r for r in recs if r["t"] + r["dt"] >= fault and r["t"] < marks["during_end"]],
             "after": [r for r in recs if r["t"] >= marks["during_end"]]}
        outside = [r for r in w["during"] if r["t"] + r["dt"] < restart[0] or r["t"] > restart[1]]
        out["streams"][s] = {k: window_stats(v) for k, v in w.items()}
        out["streams"][s]["during_outside_restart"] = window_stats(outside)
        out["streams"][s]["role"] = "touched" if s in touched else "shares touched variant" if s in shared else "untouched"
    crit = out["criteria"]
    if untouched and sc.get("check_untouched", True):
        errs = {s: sum(out["streams"][s][k]["errors"] for k in ("before", "during", "after")) for s in untouched}
        crit["untouched: 0 errors"] = {"pass": sum(errs.values()) == 0, "value": errs}
        crit["untouched: p99 within 25% or 20 ms"] = _p99_verdict(out["streams"], untouched)
    if touched | shared and sc.get("check_refusals", True):
        crit["touched: 200 or refusal within 100 ms"] = _refusal_verdict(
            by_stream, touched | shared, fault + detect, min(down_until, up_at) if up_at else down_until)
    if touched | shared and sc.get("check_recovery", True):
        limit = sc.get("recovery_limit_s", RECOVERY_S)
        worst = None if any(v is None for v in recovery.values()) else max(recovery.values(), default=0.0)
        crit[f"recovery within {limit:g} s"] = {"pass": worst is not None and worst <= limit, "value": recovery}
    if sc.get("readyz") is not None:
        # A hung process is down until its SIGCONT; a killed one until its successor answers, as far as the
        # clients can tell: until the last of its requests that was refused as down (not as busy) or failed
        # started, and no later than the first it answered. A 200 from /readyz after that cannot be shown to
        # be a lie (clients that honour Retry-After ask again later).
        last = up_at if up_at is not None else down_until
        end = cleared if cleared > fault else min(last, max(
            (r["t"] for s in touched for r in by_stream[s]
             if fault <= r["t"] <= last and r["st"] != 200 and r.get("why") != "busy"), default=fault))
        down = (fault + detect, end) if sc.get("counted_down") else None
        if sc.get("down"):  # (seconds after the fault, end or None: the end of the scenario)
            down = (fault + sc["down"][0], sc["down"][1] or marks["end"])
        # With the gateway process gone, nothing can answer: BentoML's arbiter keeps the listening socket,
        # so a probe waits and times out, which every orchestrator counts as not ready (the truth).
        silent = None
        if sc.get("kind") == "gateway":
            back = [r["t"] + r["dt"] for r in sc["records"] if r["t"] >= fault and r["st"] == 200]
            silent = (fault, min(back) if back else marks["end"])
        crit["/readyz told the truth"] = readyz_verdict(sc["readyz"], fault, down, silent)
    if sc.get("kind") == "sigterm":
        crit["sigterm: 0 resets of admitted requests"] = sigterm_verdict(sc["records"], marks["fault"])
    for name, verdict in sc.get("extra_criteria", {}).items():
        crit[name] = verdict
    verdicts = [c["pass"] for c in crit.values() if c["pass"] is not None]
    out["pass"] = None if sc.get("skipped") else all(verdicts)
    return out


def _p99_verdict(streams: dict, names: list[str]) -> dict:
    value, ok = {}, True
    for s in names:
        before = streams[s]["before"]
        if before["n"] < MIN_SAMPLES:
            value[s] = f"n/a ({before['n']} requests before)"
            continue
        limit = max(before["p99_ms"] * P99_RATIO, before["p99_ms"] + P99_SLACK_MS)
        row = {"before": before["p99_ms"], "limit": round(limit, 1)}
        for k in ("during_outside_restart", "after"):
            w = streams[s][k]
            row[k] = w["p99_ms"] if w["n"] >= MIN_SAMPLES else None
            ok &= row[k] is None or row[k] <= limit
        value[s] = row
    return {"pass": ok, "value": value}


def _refusal_verdict(by_stream: dict, names: set, since: float, until: float) -> dict:
    """Bad: a request sent while the variant is down (`since`..`until`) that is neither a refusal within
    REFUSAL_MS nor a 200 within WAIT_S; and any request that still waits WAIT_S after `since` (hung)."""
    bad, refusals, n, hung = 0, [], 0, 0
    for s in names:
        for r in by_stream[s]:
            waited = r["dt"] > WAIT_S and r["t"] < until and r["t"] + r["dt"] > since + WAIT_S
            hung += waited
            if not since <= r["t"] < until:
                bad += waited
                continue
            n += 1
            if r["st"] in (429, 503):
                refusals.append(r["dt"] * 1000)
                bad += waited or r["dt"] * 1000 > REFUSAL_MS
            else:
                bad += waited or r["st"] != 200
    return {"pass": bad == 0, "value": {"requests while down": n, "neither 200 nor a fast refusal": bad,
                                        f"waited over {WAIT_S:g} s": hung, "refusals": len(refusals),
                                        "refusal p99 ms": _round(p99(refusals))}}


def readyz_verdict(polls: list[dict], fault: float, down: tuple[float, float] | None,
                   silent: tuple[float, float] | None = None) -> dict:
    """Lies: a timeout anywhere, except while the gateway process itself is gone (`silent`: nothing there
    to answer, and a probe's timeout is its failure); 200 while a counted variant is down; not 200
    before the fault."""
    def gone(p):
        return silent is not None and silent[0] <= p["t"] <= silent[1]

    timeouts = sum(1 for p in polls if p["st"] == "timeout" and not gone(p))
    # a 200 is a lie only if it was both asked and answered inside the window: a poll that waited past its end
    # was answered about a worker that may be back
    ready_while_down = sum(1 for p in polls
                           if down and down[0] <= p["t"] and p["t"] + p["dt"] <= down[1] and p["st"] == 200)
    unready_before = sum(1 for p in polls if p["t"] < fault and p["st"] != 200)
    slowest = max((p["dt"] for p in polls), default=0.0)
    return {"pass": timeouts == ready_while_down == unready_before == 0,
            "value": {"polls": len(polls), "timeouts": timeouts,
                      **({"timeouts while the gateway process was gone (not ready)": sum(
                          1 for p in polls if p["st"] == "timeout" and gone(p))} if silent else {}),
                      "ready while down": ready_while_down,
                      "not ready before the fault": unready_before, "slowest ms": round(slowest * 1000, 1)}}


def sigterm_verdict(records: list[dict], signal_at: float) -> dict:
    """Requests in flight at the signal (admitted) must not be reset; what the later ones got is shown."""
    admitted = [r for r in records if r["t"] < signal_at < r["t"] + r["dt"]]
    later = [r for r in records if r["t"] >= signal_at]
    resets = sum(1 for r in admitted if r["e"] == "reset")
    return {"pass": resets == 0, "value": {"in flight at the signal": window_stats(admitted)["statuses"],
                                           "resets": resets, "sent after": window_stats(later)["statuses"]}}


def _fmt(v) -> str:
    if isinstance(v, dict):
        return "; ".join(f"{k}: {_fmt(x)}" for k, x in v.items())
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def render(results: dict) -> str:
    lines = [f"# Chaos run {results['run']}", "",
             f"{results.get('date', '')}, {results.get('machine', {}).get('host', '')} "
             f"({results.get('machine', {}).get('cpu', '')}, {results.get('machine', {}).get('cores', '')} cores); "
             f"git {results.get('versions', {}).get('git', '')}; store copy of {results.get('store', '')}", "",
             "| scenario | verdict | recovery s | untouched errors | touched: bad / requests while down | "
             "/readyz lies (timeouts, ready while down) |",
             "|---|---|---|---|---|---|"]
    for sc in results["scenarios"]:
        a = sc.get("analysis", {})
        c = a.get("criteria", {})
        verdict = "skipped" if sc.get("skipped") else "PASS" if a.get("pass") else "FAIL"
        unt = c.get("untouched: 0 errors", {}).get("value")
        ref = c.get("touched: 200 or refusal within 100 ms", {}).get("value") or {}
        rz = c.get("/readyz told the truth", {}).get("value") or {}
        lines.append(f"| {sc['name']} | {verdict} | {_fmt(a.get('recovery_s', '')) or '-'} | "
                     f"{_fmt(sum(unt.values())) if isinstance(unt, dict) else '-'} | "
                     f"{ref.get('neither 200 nor a fast refusal', '-')} / {ref.get('requests while down', '-')} | "
                     f"{rz.get('timeouts', '-')}, {rz.get('ready while down', '-')} |")
    for note in results.get("notes", []):
        lines += ["", f"- {note}"]
    for sc in results["scenarios"]:
        lines += ["", f"## {sc['name']}", "", sc.get("description", "")]
        if sc.get("skipped"):
            lines += ["", f"Skipped: {sc['skipped']}"]
            continue
        if sc.get("fault"):
            lines += ["", f"Fault: {_fmt(sc['fault'])}"]
        a = sc["analysis"]
        lines += ["", "| criterion | verdict | figures |", "|---|---|---|"]
        for name, c in a["criteria"].items():
            verdict = "n/a" if c["pass"] is None else "pass" if c["pass"] else "FAIL"
            lines.append(f"| {name} | {verdict} | {_fmt(c['value'])} |")
        lines += ["", "| stream | role | clients | window | requests | statuses | p50 ms | p99 ms | fallback |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for s, w in a["streams"].items():
            for k in ("before", "during", "during_outside_restart", "after"):
                x = w[k]
                lines.append(f"| {s} | {w['role']} | {sc['clients'].get(s, '')} | {k} | {x['n']} | "
                             f"{_fmt(x['statuses'])} | {x['p50_ms']} | {x['p99_ms']} | {x['fallback']} |")
    return "\n".join(lines) + "\n"


def summary_table(results: dict) -> str:
    """The table at the top of the report (what the command prints)."""
    text = render(results)
    return text.split("\n## ", 1)[0]


def write(out: Path, results: dict) -> Path:
    (out / "report.md").write_text(render(results))
    return out / "report.md"
