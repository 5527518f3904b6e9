"""`effnet dashboard`: the Grafana dashboard of the service, generated with grafanalib from the series that
service/metrics.py defines (their names are read from there, never retyped).

`build()` is the dashboard, `render()` its JSON text; deploy/grafana/effnet-dashboard.json is `render()`'s
output, committed, and a test fails when the two differ. Every panel queries one Prometheus data source
chosen by the `datasource` variable (not an import-time `__inputs` entry, which Grafana's file provisioning
does not resolve), and every expression is filtered by the `route` variable.
"""
from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "deploy" / "grafana" / "effnet-dashboard.json"
UID = "effnet-serving"  # fixed, so that an import replaces the earlier version instead of adding a copy
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"  # Grafana's: at least four scrape intervals, so a rate always has two samples
QUANTILES = (0.5, 0.95, 0.99)

DESCRIPTION = """\
Write the Grafana dashboard of the service as JSON (default: to standard output). Its panels: traffic
share per variant against the split weight, latency p50/p95/p99 per variant, online accuracy with its
95% interval per variant (from POST /feedback), feedback per variant, shadow agreement, errors and
refusals, and variant readiness. Two variables: `datasource` (a Prometheus that scrapes the server's
/metrics) and `route`. Import the file in Grafana (Dashboards > New > Import) or provision it.

The committed copy is deploy/grafana/effnet-dashboard.json; after changing the metrics or the panels,
write it again with `effnet dashboard --out deploy/grafana/effnet-dashboard.json` (a test checks that
the two agree). docs/operations.md ("Dashboard") says what each panel shows."""


def series(metric, suffix: str = "") -> str:
    """The exported name of a prometheus_client metric of service/metrics.py (counters end in `_total`)."""
    family = metric.describe()[0]
    return family.name + ("_total" if family.type == "counter" else "") + suffix


def build():
    """The dashboard as a grafanalib object (panel ids assigned)."""
    from grafanalib import core as g

    from service import metrics as m

    route = 'route=~"$route"'
    classify = f'endpoint="classify", {route}'
    agreed, compared = f'result="agree", {route}', f'result=~"agree|disagree", {route}'
    pair = "route, variant, primary"  # a shadow (variant) against the variant it mirrored
    not_ok = 'status!="200", route=~"$route|none"'
    of_route = 'route=~"(.*,)?($route)(,.*)?"'  # effnet_variant_info's route: the variant's routes, comma-joined

    def panel(kind, title: str, description: str, targets: list[tuple[str, str]], x: int, y: int, w: int = 12,
              h: int = 8, **opts):
        return kind(title=title, description=description, dataSource=DATASOURCE,
                    targets=[g.Target(expr=expr, legendFormat=legend, refId=chr(ord("A") + i), datasource=DATASOURCE)
                             for i, (expr, legend) in enumerate(targets)],
                    gridPos=g.GridPos(h=h, w=w, x=x, y=y), **opts)

    def rate(name: str, selector: str, by: str) -> str:
        return f"sum by ({by}) (rate({name}{{{selector}}}[{RATE}]))"

    assignments = series(m.ASSIGNMENTS)
    duration = series(m.E2E_LATENCY, "_bucket")
    shadow = series(m.SHADOW)
    panels = [
        panel(g.TimeSeries, "Traffic share per variant",
              "Share of each route's routing decisions that went to each variant (solid), against the split "
              "weight the route is configured with (dashed): a policy or PATCH /routes moves the weight, the "
              "share follows",
              [(f"{rate(assignments, route, 'route, variant')} / on (route) group_left "
                f"{rate(assignments, route, 'route')}", "{{route}} {{variant}}"),
               (f"{series(m.SPLIT_WEIGHT)}{{{route}}}", "{{route}} {{variant}} weight")],
              0, 0, unit="percentunit", valueMin=0, valueMax=1,
              overrides=[_dashed(" weight$")]),
        panel(g.TimeSeries, "Latency per variant (p50, p95, p99)",
              "Gateway time per /classify request, from the body received to the answer ready, by variant",
              [(f"histogram_quantile({q}, {rate(duration, classify, 'le, variant')})",
                f"{{{{variant}}}} p{round(q * 100)}") for q in QUANTILES],
              12, 0, unit="s"),
        panel(g.TimeSeries, "Online accuracy with its 95% interval",
              "Each variant's accuracy on the answers labelled through POST /feedback (solid) and the bounds of "
              "its 95% Wilson interval (dashed), as GET /experiments/ROUTE computes them; shadow=true: the "
              "variant's mirrored answers. Intervals that overlap do not yet rank the variants: the experiment's "
              "decision is in GET /experiments/ROUTE",
              [(f"{series(m.ONLINE_ACCURACY)}{{{route}}}", "{{variant}} shadow={{shadow}} {{bound}}")],
              0, 8, unit="percentunit", overrides=[_dashed(" (low|high)$")]),
        panel(g.TimeSeries, "Feedback per variant",
              "Labelled answers per second, right and wrong, by variant (a shadow's are counted under the "
              "shadow variant): what the accuracy beside it is measured on",
              [(rate(series(m.FEEDBACK), route, "variant, correct"), "{{variant}} correct={{correct}}")],
              12, 8, unit="reqps"),
        panel(g.TimeSeries, "Shadow agreement",
              "Share of mirrored requests where the shadow's top-1 class equals the primary's, by shadow and "
              "primary variant; errors are left out (they are in the errors panel's rates)",
              [(f"{rate(shadow, agreed, pair)} / {rate(shadow, compared, pair)}",
                "{{variant}} vs {{primary}}")],
              0, 16, unit="percentunit", valueMin=0, valueMax=1),
        panel(g.TimeSeries, "Errors and refusals",
              "Classified images per second that were not answered 200, by HTTP status and variant: 4xx other "
              "than 429 are the client's mistakes, 429/503 capacity refusals, 500/502/504 the service's faults, "
              "499 clients that left. variant=none: refused before routing (route none, shown with every route)",
              [(rate(series(m.REQUESTS), not_ok, "variant, status"),
                "{{variant}} {{status}}")],
              12, 16, unit="reqps"),
        panel(g.Stat, "Variant readiness",
              "1 once the variant's workers have verified their checkpoint and the gateway's health check finds "
              "them serving (/readyz says why not), for the variants of the route",
              [(f"max by (variant) ({series(m.VARIANT_READY)}) and on (variant) "
                f"({series(m.VARIANT_INFO)}{{{of_route}}} == 1)", "{{variant}}")],
              0, 24, w=24, h=4, reduceCalc="lastNotNull", graphMode="none", colorMode="background",
              thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 1}],
              mappings=[{"type": "value", "options": {"0": {"text": "not ready"}, "1": {"text": "ready"}}}]),
    ]
    variables = [
        g.Template(name="datasource", label="Data source", query="prometheus", type="datasource"),
        g.Template(name="route", label="Route", query=f"label_values({series(m.SPLIT_WEIGHT)}, route)",
                   dataSource=DATASOURCE, includeAll=True, multi=True, allValue=".*", default="$__all"),
    ]
    return g.Dashboard(title="effnet serving: variants and experiments", uid=UID, tags=["effnet"],
                       description="Traffic, latency, online accuracy and health of each variant of each route",
                       panels=panels, templating=g.Templating(list=variables), refresh="10s", schemaVersion=39,
                       time=g.Time("now-1h", "now"), timezone="browser").auto_panel_ids()


def _dashed(name_regex: str) -> dict:
    """A field override that draws the series whose display name matches as dashed lines."""
    return {"matcher": {"id": "byRegexp", "options": f"/{name_regex}/"},
            "properties": [{"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}}]}


def render() -> str:
    """The dashboard's JSON text, as committed: keys sorted, two-space indent, a final newline."""
    import json

    from grafanalib._gen import DashboardEncoder

    return json.dumps(build().to_json_data(), cls=DashboardEncoder, sort_keys=True, indent=2) + "\n"


def expressions(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel of a dashboard's JSON."""
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]


def run(args: argparse.Namespace) -> int:
    text = render()
    if args.out is None:
        print(text, end="")
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out} ({len(build().panels)} panels)")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("dashboard", help="write the Grafana dashboard JSON of the service's metrics",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="write it to this file instead of standard output")
    p.set_defaults(func=run)
