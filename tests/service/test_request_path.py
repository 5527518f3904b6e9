"""The request path (service.gateway): one error-to-status and metrics path for both classify handlers.

Without a server: the gateway is assembled around a stand-in worker and driven through Starlette."""
import types
import warnings

import pytest
from starlette.applications import Starlette
from starlette.routing import Route

with warnings.catch_warnings():  # starlette asks for httpx2 for its test client; httpx is what is installed
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from service import metrics
from service.config import parse_config
from tests.service.fakes import RGB, FlakyWorker, dispatcher_with, encode, gateway

ONE_ROUTE = {"variants": {"b0": {"model": "b0:latest"}}, "routes": {"r": {"split": ["b0"]}}}


@pytest.fixture
def client():
    cfg = parse_config(ONE_ROUTE)
    gw = gateway(cfg, {"b0": types.SimpleNamespace(classes=["a", "b", "c"], num_classes=3, resolution=32, resize=None)})
    gw.dispatcher = gw.shadows.dispatcher = dispatcher_with(FlakyWorker(0), cfg=cfg)
    app = Starlette(routes=[Route("/classify", gw.classify, methods=["POST"]),
                            Route("/classify_batch", gw.classify_batch, methods=["POST"])])
    with TestClient(app) as c:
        yield c


def count(endpoint, route, variant, status):
    return metrics.REQUESTS.labels(endpoint, route, variant, status)._value.get()


def test_an_answer_names_the_route_the_variant_and_the_top_k(client):
    before = count("classify", "r", "b0", "200")
    r = client.post("/classify", files={"image": ("a.png", encode(RGB, "PNG"))}, data={"top_k": "2"})
    body = r.json()
    assert r.status_code == 200 and r.headers["x-request-id"] == body["request_id"]
    assert (body["route"], body["variant"], body["assignment"]) == ("r", "b0", "default")
    assert [p["label"] for p in body["predictions"]] == ["b", "a"]  # the stand-in worker says class 1
    assert count("classify", "r", "b0", "200") == before + 1


def test_a_refusal_before_routing_is_counted_without_route_or_variant(client):
    for endpoint in ("classify", "classify_batch"):
        before = count(endpoint, "none", "none", "400")
        r = client.post(f"/{endpoint}", content=b"{}", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]
        assert r.json()["request_id"] == r.headers["x-request-id"]
        assert count(endpoint, "none", "none", "400") == before + 1


def test_a_refusal_after_routing_is_counted_once_with_its_status(client):
    """Too many images: refused once routed, counted once with the route's labels (not per image). An
    unknown variant is refused while routing, so without them."""
    before = count("classify_batch", "r", "b0", "400")
    r = client.post("/classify_batch", files=[("images", ("a.png", encode(RGB, "PNG")))], data={"variant": "b7"})
    assert r.status_code == 400 and "unknown variant 'b7'" in r.json()["error"]
    r = client.post("/classify_batch", files=[("images", ("a.png", b"not an image"))] * 33)
    assert r.status_code == 400 and "33 images is above the limit of 32" in r.json()["error"]
    assert count("classify_batch", "r", "b0", "400") == before + 1


def test_a_batch_counts_each_image_and_a_bad_one_fails_alone(client):
    ok, bad = count("classify_batch", "r", "b0", "200"), count("classify_batch", "r", "b0", "400")
    r = client.post("/classify_batch", files=[("images", ("a.png", encode(RGB, "PNG"))),
                                              ("images", ("b.png", b"not an image")),
                                              ("images", ("c.png", encode(RGB, "PNG")))])
    results = r.json()["results"]
    assert r.status_code == 200 and [x["status"] for x in results] == [200, 400, 200]
    assert results[1]["filename"] == "b.png" and results[0]["request_id"].endswith("-0")
    assert count("classify_batch", "r", "b0", "200") == ok + 2 and count("classify_batch", "r", "b0", "400") == bad + 1
