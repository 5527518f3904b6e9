"""PromQL over one load step's window: latency quantiles, throughput, batch size, errors, per variant.

A step runs from `t0` (a scrape has seen everything before it) to `t1` (a scrape has seen everything
it sent), so the change of every counter between `@ t0` and `@ t1` is exactly the step's traffic.
`increase()` is not used for counts: it extrapolates and misses series born inside the window.

The service's metric names are discovered from Prometheus (`MetricNames.discover`), so a renamed
metric shows up in the report as "not found" instead of as zeros.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from .prometheus import PrometheusServer

QUANTILES = (0.5, 0.95, 0.99)
# Statuses that refuse a bad request (the load test's broken uploads); 429/503/5xx are errors.
REFUSALS = ("400", "413", "415", "422")


@dataclass
class Window:
    t0: float
    t1: float
    load_s: float  # seconds of load inside the window (throughput divides by this)


@dataclass
class MetricNames:
    """Base names (no `_bucket`/`_total` suffix decisions left to callers) and label keys."""

    requests: str | None = None  # counter, labels variant/route/status
    latency: str | None = None  # end-to-end histogram, seconds
    inference: str | None = None  # inference-only histogram, seconds
    batch_size: str | None = None  # histogram
    queue_wait: str | None = None  # histogram, seconds
    assignments: str | None = None  # counter, labels route/variant(/assignment)
    shadow: str | None = None  # counter(s) of shadow comparisons
    bento_latency: str | None = None  # bentoml_service_request_duration_seconds
    bento_requests: str | None = None  # bentoml_service_request_total
    status_label: str = "status"
    variant_label: str = "variant"
    notes: list[str] = field(default_factory=list)

    @classmethod
    def discover(cls, prom: PrometheusServer) -> "MetricNames":
        names = set(prom.series_names())
        n = cls()

        def pick(patterns, kind):
            suffix = {"histogram": "_bucket", "counter": "_total"}[kind]
            for pat in patterns:
                for name in sorted(names):
                    if name.endswith(suffix) and re.search(pat, name):
                        return name[: -len(suffix)] if kind == "histogram" else name
            return None

        n.requests = pick([r"^effnet_requests_total$", r"^effnet_.*request.*_total$"], "counter")
        n.latency = pick([r"^effnet_request_(duration|latency)_seconds", r"^effnet_.*(end_to_end|e2e|request).*seconds"],
                         "histogram")
        n.inference = pick([r"^effnet_.*inference.*seconds"], "histogram")
        n.batch_size = pick([r"^effnet_.*batch_size"], "histogram")
        n.queue_wait = pick([r"^effnet_.*(queue|wait).*seconds"], "histogram")
        n.assignments = pick([r"^effnet_.*(assign|split).*_total$"], "counter")
        n.shadow = pick([r"^effnet_.*shadow.*_total$"], "counter")
        n.bento_latency = pick([r"^bentoml_service_request_duration_seconds"], "histogram")
        n.bento_requests = pick([r"^bentoml_service_request_total$"], "counter")
        if n.requests:
            labels = _label_keys(prom, n.requests)
            n.status_label = next((k for k in ("status", "code", "status_code", "http_status", "outcome") if k in labels),
                                  n.status_label)
            n.variant_label = next((k for k in ("variant", "model") if k in labels), n.variant_label)
        for role in ("requests", "latency", "batch_size", "assignments", "shadow"):
            if getattr(n, role) is None:
                n.notes.append(f"no effnet_ metric for {role} found in Prometheus")
        return n

    def to_dict(self) -> dict:
        return asdict(self)


def _label_keys(prom: PrometheusServer, name: str) -> set[str]:
    series = prom.api("series", {"match[]": name})
    return {k for s in series for k in s}


def _sel(**labels) -> str:
    parts = [f'{k}="{v}"' for k, v in labels.items() if v is not None]
    return "{" + ",".join(parts) + "}"


def delta(prom: PrometheusServer, expr_at, w: Window, by: str = "") -> dict[str, float]:
    """Change of `sum [by (labels)] (metric)` between t0 and t1: {label value(s) or "": count}.

    `expr_at(t)` returns the PromQL of the summed metric at time t (with an `@` modifier).
    """
    q = f"({expr_at(w.t1)}) - ({expr_at(w.t0)} or ({expr_at(w.t1)}) * 0)"
    out = {}
    for r in prom.query(q, at=w.t1):
        key = ",".join(r["metric"].get(k.strip(), "") for k in by.split(",")) if by else ""
        out[key] = round(r["value"], 6)
    return out


def counter_delta(prom, metric: str, w: Window, sel: str = "", by: str = "") -> dict[str, float]:
    agg = f"sum by ({by})" if by else "sum"
    return delta(prom, lambda t: f"{agg} ({metric}{sel} @ {t:.3f})", w, by)


def quantiles(prom, histogram: str, w: Window, sel: str = "", qs=QUANTILES) -> dict[str, float | None]:
    """Quantiles (seconds) of a histogram's observations inside the window."""
    buckets = (f"sum by (le) ({histogram}_bucket{sel} @ {w.t1:.3f}) - "
               f"(sum by (le) ({histogram}_bucket{sel} @ {w.t0:.3f}) or sum by (le) ({histogram}_bucket{sel} @ {w.t1:.3f}) * 0)")
    out = {}
    for q in qs:
        v = prom.scalar(f"histogram_quantile({q}, {buckets})", at=w.t1)
        out[f"p{int(round(q * 100))}"] = v
    return out


def mean(prom, histogram: str, w: Window, sel: str = "") -> float | None:
    s = counter_delta(prom, f"{histogram}_sum", w, sel).get("")
    c = counter_delta(prom, f"{histogram}_count", w, sel).get("")
    return s / c if s is not None and c else None


def step_metrics(prom: PrometheusServer, names: MetricNames, w: Window, variant: str | None,
                 endpoint: str = "/classify") -> dict:
    """Everything Prometheus says about one step, for one variant (None: the whole service)."""
    vsel = _sel(**{names.variant_label: variant}) if variant else ""
    out: dict = {"source": {}}
    if names.requests:
        by_status = counter_delta(prom, names.requests, w, vsel, by=names.status_label)
        total = sum(by_status.values())
        ok = sum(v for k, v in by_status.items() if k.startswith("2") or k in ("ok", "success"))
        # Broken uploads are sent on purpose and must be refused: a refusal is not a service error.
        refused = sum(v for k, v in by_status.items() if k in REFUSALS)
        errors = total - ok - refused
        out.update(requests=total, ok=ok, refused=refused, errors=errors, by_status=by_status,
                   error_rate=errors / total if total else None, throughput=ok / w.load_s if w.load_s else None)
        out["source"]["requests"] = names.requests
    if names.latency:
        lat_sel = vsel
        out["latency_s"] = quantiles(prom, names.latency, w, lat_sel)
        out["source"]["latency"] = names.latency
    elif names.bento_latency and variant is None:
        out["latency_s"] = quantiles(prom, names.bento_latency, w, _sel(endpoint=endpoint))
        out["source"]["latency"] = names.bento_latency
    if names.inference:
        out["inference_s"] = quantiles(prom, names.inference, w, vsel)
    if names.batch_size:
        out["batch_size_mean"] = mean(prom, names.batch_size, w, vsel)
    if names.queue_wait:
        out["queue_wait_s"] = quantiles(prom, names.queue_wait, w, vsel, qs=(0.5, 0.95))
    if names.bento_requests and variant is None:
        out["bentoml_requests"] = counter_delta(prom, names.bento_requests, w, _sel(endpoint=endpoint)).get("")
    return out


def split_metrics(prom: PrometheusServer, names: MetricNames, w: Window, route: str) -> dict:
    """Realised split shares and shadow agreement over a window, from the service's own counters."""
    out: dict = {}
    if names.assignments:
        counts = counter_delta(prom, names.assignments, w, _sel(route=route), by=names.variant_label)
        total = sum(counts.values())
        out["assignments"] = counts
        out["shares"] = {k: v / total for k, v in counts.items()} if total else {}
    if names.shadow:
        labels = _label_keys(prom, names.shadow)
        agree_key = next((k for k in ("agree", "agreed", "agreement", "outcome", "result") if k in labels), None)
        if agree_key:
            counts = counter_delta(prom, names.shadow, w, _sel(route=route) if "route" in labels else "", by=agree_key)
            yes = sum(v for k, v in counts.items() if k in ("true", "1", "yes", "agree", "agreed", "True"))
            no = sum(v for k, v in counts.items() if k in ("false", "0", "no", "disagree", "disagreed", "False"))
            # Skipped or failed mirrors are shown, but agreement is over the comparisons made.
            out["shadow"] = {"compared": yes + no, "agreed": yes, "rate": yes / (yes + no) if yes + no else None,
                             "by": counts, "metric": names.shadow}
        else:
            out["shadow"] = {"metric": names.shadow, "labels": sorted(labels),
                             "note": "no agree/disagree label on the shadow metric"}
    return out
