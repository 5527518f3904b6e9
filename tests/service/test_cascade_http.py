"""A cascade route through a real `bentoml serve`: a confident image is answered by the first stage, an
ambiguous one goes on to the second, a stage that cannot serve escalates, and the answer, GET /routes and
/metrics say what happened. Every variant runs in the gateway's process (no worker to start)."""
from __future__ import annotations

import io
import re

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from tests.support.serving import FASHION_CLASSES, Server, make_checkpoint, write_config

pytestmark = pytest.mark.server


def _png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (28, 28), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


IMAGES = {seed: _png(seed) for seed in range(12)}


def _confidences(home, tag: str) -> dict[int, float]:
    """The first stage's calibrated top-1 probability of each image, computed offline as the service does."""
    import torch

    from loadtest.offline import decode
    from store import InputNormalizer, load_checkpoint, resize_crop

    model, man = load_checkpoint(tag, home=home)
    x = torch.cat([resize_crop(decode(data, man), man) for data in IMAGES.values()])
    with torch.no_grad():
        p = torch.softmax(model(InputNormalizer(man)(x)).double() / man.temperature, 1)
    return dict(zip(IMAGES, p.max(1).values.tolist()))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("cascade") / "bentoml"
    for name, variant, seed in (("compact-fashion-mnist", "compact", 3), ("b0-fashion-mnist", "b0", 1)):
        make_checkpoint(home, name, variant, FASHION_CLASSES, 32, grayscale=True, seed=seed)
    conf = _confidences(home, "compact-fashion-mnist:latest")
    sure, unsure = max(conf, key=conf.get), min(conf, key=conf.get)
    assert conf[sure] - conf[unsure] > 0.01, conf  # the threshold goes between them
    # the threshold as `effnet cascade fit` writes it, in a file beside the configuration
    (home.parent / "cascade-fashion.yaml").write_text(yaml.safe_dump(
        {"stages": ["compact", "b0"], "thresholds": [round((conf[sure] + conf[unsure]) / 2, 6)]}))
    local = {"engine": "torch", "placement": "gateway"}
    cfg = write_config(home.parent / "serve.yaml", {
        # a variant whose checkpoint is missing never serves: the routes without it still do
        "server": {"cpu_threads": 1, "readiness": "routes"},
        "default_route": "fashion",
        "variants": {"compact": {"model": "compact-fashion-mnist:latest", **local},
                     "b0": {"model": "b0-fashion-mnist:latest", **local},
                     "broken": {"model": "no-such-checkpoint:latest", **local}},
        "routes": {
            "fashion": {"split": ["compact", "b0"],
                        "policy": {"cascade": {"stages": ["compact", "b0"], "thresholds_file": "cascade-fashion.yaml"}}},
            "averaged": {"split": ["compact", "b0"],
                         "policy": {"cascade": {"stages": ["compact", "b0"], "thresholds": [1.01], "average_last": True}}},
            "down": {"split": ["broken", "b0"],
                     "policy": {"cascade": {"stages": ["broken", "b0"], "thresholds": [0.0]}}},
        },
    })
    with Server(home, cfg) as s:
        for variant in ("compact", "b0"):  # `readiness: routes` is ready once either answers in each route
            s.wait(f"/readyz/{variant}", timeout=180)
        s.client = httpx.Client(base_url=s.url, timeout=60)
        s.sure, s.unsure = sure, unsure
        yield s
        s.client.close()


def _classify(server, seed: int, **data) -> dict:
    r = server.client.post("/classify", files={"image": ("x.png", IMAGES[seed], "image/png")}, data=data)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_confident_image_is_answered_by_the_first_stage_alone(server):
    a = _classify(server, server.sure, route="fashion")
    assert a["variant"] == "compact" and a["assignment"] == "cascade", a
    assert [(s["variant"], s["escalated"]) for s in a["cascade"]] == [("compact", False)]
    assert a["cascade"][0]["score"] == a["predictions"][0]["score"]


def test_an_ambiguous_image_goes_on_to_the_second_stage(server):
    a = _classify(server, server.unsure, route="fashion")
    assert a["variant"] == "b0"
    assert [(s["variant"], s["escalated"]) for s in a["cascade"]] == [("compact", True), ("b0", False)]
    assert a["cascade"][0]["score"] < a["cascade"][0]["threshold"]
    alone = _classify(server, server.unsure, route="fashion", variant="b0")  # an explicit variant answers alone
    assert "cascade" not in alone and alone["assignment"] == "explicit"
    assert alone["predictions"] == a["predictions"]


def test_average_last_answers_the_mean_of_both_stages(server):
    every = {"route": "averaged", "top_k": str(len(FASHION_CLASSES))}
    a = _classify(server, 5, **every)
    first = _classify(server, 5, **every, variant="compact")["predictions"]
    last = _classify(server, 5, **every, variant="b0")["predictions"]
    assert a["averaged"] == ["compact", "b0"]
    both = {p["index"]: p["score"] for p in first}, {p["index"]: p["score"] for p in last}
    assert {p["index"]: p["score"] for p in a["predictions"]} == {
        i: pytest.approx((both[0][i] + both[1][i]) / 2, abs=1e-5) for i in both[0]}


def test_a_stage_that_cannot_serve_escalates(server):
    a = _classify(server, 1, route="down")
    assert a["variant"] == "b0"
    assert a["cascade"][0]["variant"] == "broken" and a["cascade"][0]["escalated"] and "error" in a["cascade"][0]


def test_a_tight_latency_budget_ends_the_cascade_at_the_first_stage(server):
    _classify(server, server.unsure, route="fashion")  # both stages answer: their service times are known
    r = server.client.post("/classify", files={"image": ("x.png", IMAGES[server.unsure], "image/png")},
                           data={"route": "fashion"}, headers={"X-Latency-Budget-Ms": "0.001"})
    a = r.json()
    assert r.status_code == 200 and a["variant"] == "compact" and a["cascade_cut_after"] == "compact", a
    assert [s["variant"] for s in a["cascade"]] == ["compact"] and a["budget_ms"] == 0.001
    loose = server.client.post("/classify", files={"image": ("x.png", IMAGES[server.unsure], "image/png")},
                               data={"route": "fashion"}, headers={"X-Latency-Budget-Ms": "60000"}).json()
    assert loose["variant"] == "b0" and "cascade_cut_after" not in loose


def test_the_assignment_of_a_cascade_route_is_per_request_not_per_client(server):
    a = server.client.get("/assignment", params={"route": "fashion", "client_id": "alice"}).json()
    assert a["variant"] is None and a["assignment"] == "cascade" and "per request" in a["why"]


def test_a_batch_goes_through_the_cascade_image_by_image(server):
    files = [("images", (f"{s}.png", IMAGES[s], "image/png")) for s in (server.sure, server.unsure)]
    r = server.client.post("/classify_batch", files=files, data={"route": "fashion"})
    assert r.status_code == 200, r.text
    assert [item["variant"] for item in r.json()["results"]] == ["compact", "b0"]


def test_routes_show_the_thresholds_and_metrics_count_the_escalations(server):
    _classify(server, server.unsure, route="fashion")
    policy = server.client.get("/routes").json()["routes"]["fashion"]["policy"]["cascade"]
    assert policy["stages"] == ["compact", "b0"] and len(policy["thresholds"]) == 1
    assert policy["thresholds_file"].endswith("cascade-fashion.yaml")
    text = server.client.get("/metrics").text

    def counted(route, variant, outcome):
        m = re.search(rf'effnet_cascade_stages_total\{{[^}}]*outcome="{outcome}",route="{route}",variant="{variant}"'
                      rf'\}} ([0-9.]+)', text)
        return float(m.group(1)) if m else 0.0

    assert counted("fashion", "compact", "escalated") >= 1
    assert counted("fashion", "compact", "answered") >= 1
    assert counted("down", "broken", "failed") >= 1
