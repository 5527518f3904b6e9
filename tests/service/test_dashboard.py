"""The Grafana dashboard (cli/dashboard.py, deploy/grafana/effnet-dashboard.json) and the online-accuracy gauges
it draws: the committed JSON is what the generator writes and a dashboard Grafana can load, the gauges carry
the counts of GET /experiments, and every panel's every query returns series from a real Prometheus that
scrapes a real `bentoml serve` while an experiment takes feedback."""
from __future__ import annotations

import asyncio
import io
import json
import os
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client import REGISTRY

from cli.dashboard import COMMITTED, build, expressions, render
from loadtest.prometheus import PROMETHEUS_BIN, PrometheusServer
from service import metrics
from service.config import parse_config
from service.experiments.live import Experiments, publish_accuracy
from service.experiments.records import VariantSummary
from service.experiments.stats import wilson
from tests.support.serving import FASHION_CLASSES, Server, make_checkpoint, write_config

ROUTE = "fashion"
RATE_WINDOW = "30s"  # $__rate_interval: the whole scripted stream, at least two 1 s scrapes of each series


def _accuracy(route: str, variant: str, shadow: bool, bound: str) -> float | None:
    return REGISTRY.get_sample_value("effnet_online_accuracy", {"route": route, "variant": variant,
                                                                "shadow": str(shadow).lower(), "bound": bound})


# the gauges

def test_the_gauges_hold_each_variants_accuracy_and_wilson_bounds_and_skip_a_variant_without_feedback():
    publish_accuracy("gauges", [VariantSummary("b0", False, 40, 20, 15, 1, 2, 3),
                                VariantSummary("mec", True, 40, 20, 19, 1, 2, 3),
                                VariantSummary("compact", False, 9, 0, 0, 1, 2, 3)])
    low, high = wilson(15, 20)
    assert [_accuracy("gauges", "b0", False, b) for b in metrics.ACCURACY_BOUNDS] == [0.75, low, high]
    assert _accuracy("gauges", "mec", True, "estimate") == 0.95 and _accuracy("gauges", "mec", False, "low") is None
    assert _accuracy("gauges", "compact", False, "estimate") is None


def test_committed_feedback_reaches_the_gauges_with_the_counts_of_get_experiments(tmp_path):
    cfg = parse_config({"server": {"experiments_db": str(tmp_path / "exp.sqlite3")},
                        "variants": {v: {"model": f"{v}-fashion-mnist"} for v in ("b0", "mec", "compact")},
                        "routes": {"gauged": {"split": {"b0": 1, "mec": 1}, "control": "b0",
                                              "shadow": {"variant": "compact", "fraction": 1.0}}}})
    ex = Experiments(cfg, {v: FASHION_CLASSES for v in ("b0", "mec", "compact")})
    labels = {"b0": [1, 1, 2, 1, 0], "mec": [1, 3, 3]}  # every answer's top-1 is class 1
    one = np.eye(len(FASHION_CLASSES))[1]

    async def stream():
        for variant, given in labels.items():
            for i, label in enumerate(given):
                rid = f"{variant}-{i}"
                ex.answered(rid, "gauged", variant, "split", one, 5.0, None)
                ex.shadowed(rid, "gauged", "compact", np.eye(len(FASHION_CLASSES))[3], 4.0)
                # one request at a time: each marks the route stale again while the publisher may be waiting
                await ex.feedback(json.dumps({"request_id": rid, "label": label}).encode())
        await ex.published()
        return await ex.results("gauged")

    try:
        result = asyncio.run(stream())
    finally:
        ex.close()
    assert _accuracy("gauged", "b0", False, "estimate") == 3 / 5
    assert _accuracy("gauged", "mec", False, "estimate") == 1 / 3
    assert _accuracy("gauged", "compact", True, "estimate") == 2 / 8  # the shadow was right on the two 3s
    for row in result["variants"]:
        got = [_accuracy("gauged", row["variant"], row["role"] == "shadow", b) for b in ("low", "high")]
        assert got == pytest.approx(row["accuracy_95"], abs=1e-4)


# the committed dashboard

def test_the_committed_dashboard_is_what_the_generator_writes():
    assert COMMITTED.read_text() == render(), "run `effnet dashboard --out deploy/grafana/effnet-dashboard.json`"


def test_the_dashboard_is_one_grafana_can_load():
    board = json.loads(COMMITTED.read_text())
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36 and not board["rows"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["route"]["query"].startswith("label_values(") and variables["route"]["includeAll"]
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels) and all(isinstance(p["id"], int) for p in panels)
    kinds = {p["type"] for p in panels}
    assert kinds <= {"timeseries", "stat"}, kinds
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and p["description"], p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]
        assert all(t["expr"] and t["datasource"] == p["datasource"] for t in p["targets"]), p["title"]
        assert all("$route" in t["expr"] for t in p["targets"]), p["title"]
        pos = p["gridPos"]
        assert pos["w"] > 0 and pos["h"] > 0 and pos["x"] + pos["w"] <= 24, p["title"]
    cells = [(p["gridPos"]["x"] + dx, p["gridPos"]["y"] + dy) for p in panels
             for dx in range(p["gridPos"]["w"]) for dy in range(p["gridPos"]["h"])]
    assert len(cells) == len(set(cells)), "panels overlap"
    titles = " / ".join(p["title"] for p in panels).lower()
    for needed in ("traffic share", "latency", "online accuracy", "shadow agreement", "errors", "readiness"):
        assert needed in titles
    assert len(build().panels) == len(panels)


# every query against a real Prometheus

def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (28, 28), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A real server whose fashion route runs an experiment (control b0, a shadow), scraped every second."""
    if not os.path.exists(PROMETHEUS_BIN):
        pytest.skip(f"{PROMETHEUS_BIN} is missing: install the Debian package `prometheus` (make setup)")
    home = tmp_path_factory.mktemp("dashboard") / "bentoml"
    for name, variant, seed in (("b0-fashion-mnist", "b0", 1), ("mec-out-e3-fashion-mnist", "mec-out-e3", 2),
                                ("compact-fashion-mnist", "compact", 3)):
        make_checkpoint(home, name, variant, FASHION_CLASSES, 32, grayscale=True, seed=seed)
    cfg = write_config(home.parent / "serve.yaml", {
        "server": {"cpu_threads": 1},
        "default_route": ROUTE,
        # b0 in a worker process, as served; the others in the gateway's, which starts faster
        "variants": {"b0": {"model": "b0-fashion-mnist:latest", "engine": "torch"},
                     "mec": {"model": "mec-out-e3-fashion-mnist:latest", "engine": "torch", "placement": "gateway"},
                     "compact": {"model": "compact-fashion-mnist:latest", "engine": "torch", "placement": "gateway"}},
        "routes": {ROUTE: {"split": {"b0": 0.5, "mec": 0.5}, "control": "b0",
                           "shadow": {"variant": "compact", "fraction": 1.0}}},
    })
    with Server(home, cfg) as server:
        server.wait("/readyz")
        with PrometheusServer({"effnet": server.url}, interval_s=1.0) as prom, \
                httpx.Client(base_url=server.url, timeout=60) as client:
            for i in range(16):  # labelled answers of both variants, half of them right
                a = client.post("/classify", files={"image": ("x.png", _png(i), "image/png")},
                                data={"route": ROUTE}, headers={"X-Client-Id": f"user-{i}"})
                assert a.status_code == 200, a.text
                top = a.json()["predictions"][0]["index"]
                label = top if i % 2 else (top + 1) % len(FASHION_CLASSES)
                r = client.post("/feedback", json={"request_id": a.json()["request_id"], "label": label})
                assert r.status_code == 200, r.text
            bad = client.post("/classify", files={"image": ("x.png", b"not an image", "image/png")})
            assert bad.status_code == 400, bad.text  # something for the errors panel
            yield prom


def _substituted(expr: str) -> str:
    return expr.replace("$__rate_interval", RATE_WINDOW).replace("$route", ROUTE)


@pytest.mark.server
def test_every_panel_query_returns_series_from_a_real_prometheus(served):
    board = json.loads(COMMITTED.read_text())
    queries = expressions(board)
    # Counters need two scrapes to have a rate and the gauges their publication: wait, bounded, for all.
    deadline, empty = time.monotonic() + 20, queries
    while empty and time.monotonic() < deadline:
        empty = [(title, expr) for title, expr in queries if not served.query(_substituted(expr))]
        if empty:
            time.sleep(0.5)
    assert not empty, f"panels whose queries return no series: {empty}"
    accuracy = served.query(_substituted(next(e for t, e in queries if "accuracy" in t.lower())))
    assert {(s["metric"]["variant"], s["metric"]["shadow"]) for s in accuracy} == {
        ("b0", "false"), ("mec", "false"), ("compact", "true")}
    route_var = next(v for v in board["templating"]["list"] if v["name"] == "route")["query"]
    metric = route_var.removeprefix("label_values(").split(",")[0]
    assert ROUTE in served.api("label/route/values", {"match[]": metric})


@pytest.mark.server
def test_the_check_fails_for_a_series_the_service_does_not_export(served):
    assert served.query(_substituted('sum by (variant) (rate(effnet_no_such_series_total{route=~"$route"}[1m]))')) == []
    assert served.query(_substituted('effnet_online_accuracy{route=~"$route", bound="median"}')) == []
