"""The service over HTTP: one real `bentoml serve` for the module (own port and BENTOML_HOME).

Checkpoints are tiny and random (`tests.support.serving.make_checkpoint`): correctness is checked against
the same checkpoint run offline, not against labels.
"""
import io
import json
import re
import socket
import threading
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from service.images import decode_image
from tests.service.fakes import huge_png
from tests.service.test_drain import _multipart_head
from tests.support.serving import FASHION_CLASSES, Server, make_checkpoint, write_config

pytestmark = [pytest.mark.slow, pytest.mark.server]

IMAGENET_CLASSES = [f"class-{i}" for i in range(12)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("serve") / "bentoml"
    tags = {
        "b0": make_checkpoint(home, "b0-fashion-mnist", "b0", FASHION_CLASSES, 32, grayscale=True, seed=1),
        "mec": make_checkpoint(home, "mec-out-e3-fashion-mnist", "mec-out-e3", FASHION_CLASSES, 32, grayscale=True, seed=2),
        "compact": make_checkpoint(home, "compact-fashion-mnist", "compact", FASHION_CLASSES, 32, grayscale=True, seed=3),
        "lite0": make_checkpoint(home, "lite0-imagenet", "lite0", IMAGENET_CLASSES, 64, seed=4),
    }
    cfg = write_config(home.parent / "serve.yaml", {
        "server": {"max_body_mb": 1, "max_pixels": 4_000_000, "max_batch_images": 8, "cpu_threads": 2},
        "default_route": "fashion",
        "variants": {v: {"model": t.split(":")[0] + ":latest", "engine": "torch", "max_batch_size": 16,
                         "max_latency_ms": 5000,
                         **({"workers": 2} if v == "lite0" else {}),  # as in service/config.yaml
                         # served in the gateway process (service/inprocess.py); the tests that name no
                         # variant in particular cover both placements
                         **({"placement": "gateway"} if v == "compact" else {})}
                     for v, t in tags.items()},
        "routes": {
            "fashion": {"split": {"b0": 0.5, "mec": 0.25, "compact": 0.25},
                        "shadow": {"variant": "mec", "fraction": 1.0}},  # every non-mec answer mirrored
            "imagenet": {"split": {"lite0": 1}},
        },
    })
    with Server(home, cfg) as s:
        s.wait("/readyz")
        s.home, s.tags = home, tags
        s.client = httpx.Client(base_url=s.url, timeout=60)
        yield s
        s.client.close()


def png(size=(40, 30), mode="RGB", seed=0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(buf := io.BytesIO(), "PNG")
    return buf.getvalue()


def jpeg(seed=0) -> bytes:
    Image.open(io.BytesIO(png(seed=seed))).save(buf := io.BytesIO(), "JPEG")
    return buf.getvalue()


def classify(server, image=None, headers=None, path="/classify", files=None, **fields):
    files = files if files is not None else ([("image", ("x.png", image, "image/png"))] if image is not None else [])
    return server.client.post(path, files=files or None, data=fields or None, headers=headers)


def offline_scores(server, variant, data):
    """The same checkpoint run in this process: what the service must answer."""
    from engines import load_engine
    from store import resize_crop

    engine, man = load_engine(server.tags[variant], threads=1, home=str(server.home))
    x = resize_crop(torch.from_numpy(decode_image(data, max_pixels=10**7, min_side=man.resolution)), man)
    return torch.softmax(engine(x), 1)[0].numpy(), man


@pytest.mark.parametrize("variant, route", [("b0", "fashion"), ("lite0", "imagenet"), ("compact", None)])
def test_explicit_variant_answers_as_the_checkpoint_does_offline(server, variant, route):
    data = jpeg(seed=3)
    fields = {"variant": variant, "top_k": "3", **({"route": route} if route else {})}
    r = classify(server, data, **fields)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["variant"] == variant and body["assignment"] == "explicit"
    assert body["route"] == (route or "fashion") and body["model"].startswith(server.tags[variant].split(":")[0])
    assert r.headers["x-request-id"] == body["request_id"] and body["latency_ms"] > 0
    scores, man = offline_scores(server, variant, data)
    expected = np.argsort(-scores, kind="stable")[:3]
    assert [p["index"] for p in body["predictions"]] == list(expected)
    assert [p["label"] for p in body["predictions"]] == [man.classes[i] for i in expected]
    np.testing.assert_allclose([p["score"] for p in body["predictions"]], scores[expected], atol=1e-4)


def test_fields_in_the_query_string_count_and_conflicts_are_refused(server):
    files = [("image", ("x.png", png(), "image/png"))]
    r = server.client.post("/classify?route=imagenet&top_k=2", files=files)
    assert r.status_code == 200 and r.json()["variant"] == "lite0" and len(r.json()["predictions"]) == 2
    r = server.client.post("/classify_batch?variant=compact", files=[("images", ("x.png", png(), "image/png"))])
    assert r.status_code == 200 and r.json()["variant"] == "compact"
    r = server.client.post("/classify?route=imagenet", files=files, data={"route": "fashion"})
    assert r.status_code == 400 and "'route' is given twice" in r.json()["error"]
    r = server.client.post("/classify?route=&top_k=2", files=files, data={"route": "imagenet"})
    assert r.status_code == 200 and r.json()["variant"] == "lite0"  # an empty parameter says nothing
    r = server.client.post("/classify?rout=imagenet", files=files)
    assert r.status_code == 400 and "unknown query parameter(s) ['rout']" in r.json()["error"]


def test_split_spreads_requests_over_the_routes_variants(server):
    seen = {classify(server, png(seed=i)).json()["variant"] for i in range(24)}
    assert seen <= {"b0", "mec", "compact"} and len(seen) >= 2
    data = png(seed=7)
    body = classify(server, data).json()
    assert body["assignment"] == "split" and body["route"] == "fashion" and len(body["predictions"]) == 5
    scores, _ = offline_scores(server, body["variant"], data)  # whichever variant the split chose
    assert [p["index"] for p in body["predictions"]] == list(np.argsort(-scores, kind="stable")[:5])
    assert classify(server, png(), route="imagenet").json()["assignment"] == "default"


def test_the_same_client_id_gets_one_variant(server):
    for client in ("alice", "bob", "carol"):
        got = {classify(server, png(seed=i), headers={"X-Client-Id": client}).json()["variant"] for i in range(20)}
        assert len(got) == 1, (client, got)


def test_two_thousand_client_ids_split_within_4_points_of_the_weights(server):
    """Sticky assignment by a hash of X-Client-Id spreads distinct clients as the weights say. /assignment
    answers without running a model (2,000 classifications would cost minutes here); that it is the
    same assignment /classify makes is checked on a sample of the ids."""
    with httpx.Client(base_url=server.url, timeout=60) as http:
        got = {}
        for i in range(2000):
            r = http.get("/assignment", params={"route": "fashion"}, headers={"X-Client-Id": f"user-{i}"})
            assert r.status_code == 200, r.text
            got[f"user-{i}"] = r.json()["variant"]
        for name, weight in {"b0": 0.5, "mec": 0.25, "compact": 0.25}.items():
            share = sum(v == name for v in got.values()) / 2000
            assert abs(share - weight) <= 0.04, (name, share)
        for client in list(got)[:: 200]:
            r = http.post("/classify", files={"image": ("x.png", png(size=(8, 8)), "image/png")},
                          headers={"X-Client-Id": client})
            assert r.json()["variant"] == got[client], client
        assert http.get("/assignment", params={"client_id": "user-7"}).json()["variant"] == got["user-7"]
        r = http.get("/assignment")
        assert r.status_code == 400 and "X-Client-Id" in r.json()["error"]
        r = http.get("/assignment", params={"route": "nope"}, headers={"X-Client-Id": "a"})
        assert r.status_code == 400 and "fashion" in r.json()["error"] and "imagenet" in r.json()["error"]


def tiff() -> bytes:
    Image.new("RGB", (8, 8)).save(buf := io.BytesIO(), "TIFF")
    return buf.getvalue()


def img(data, name="upload.jpg"):
    return ("image", (name, data, "image/jpeg"))  # the declared type is ignored: bytes decide


def text(field, value):
    return (field, (None, value))  # a plain multipart text field


BAD = [
    # (case, multipart parts, status, message regex)
    ("garbage bytes", [img(b"not an image at all" * 10)], 400, "not a supported image"),
    ("truncated jpeg", [img(jpeg()[:300])], 400, "truncated or corrupt"),
    ("empty file", [img(b"")], 400, "empty"),
    ("tiff is not allowed", [img(tiff())], 400, "not a supported image"),
    ("missing file", [text("variant", "b0")], 400, "missing file field 'image'"),
    ("image as text", [text("image", "hello")], 400, "'image' must be a file"),
    ("variant as file", [img(png()), ("variant", ("v.txt", b"b0", "text/plain"))], 400, "'variant' must be a text value"),
    ("unknown variant", [img(png()), text("variant", "b7")], 400, "unknown variant 'b7'; variants: b0, mec, compact, lite0"),
    ("unknown route", [img(png()), text("route", "cats")], 400, "unknown route 'cats'; routes: fashion, imagenet"),
    # Starlette reads a field that is not UTF-8 as Latin-1: the message names the raw byte, not 'ÿ'
    ("variant not UTF-8", [img(png()), text("variant", b"b0\xff")], 400, r"unknown variant 'b0\\xff'; variants: b0"),
    ("route in other letters", [img(png()), text("route", "caf\u00e9")], 400, r"unknown route 'caf\\xe9'"),
    ("variant outside route", [img(png()), text("route", "imagenet"), text("variant", "b0")], 400,
     "not in route 'imagenet'"),
    ("top_k zero", [img(png()), text("top_k", "0")], 400, "top_k must be from 1 to 10"),
    ("top_k too big", [img(png()), text("variant", "lite0"), text("top_k", "13")], 400, "top_k must be from 1 to 12"),
    ("top_k not a number", [img(png()), text("top_k", "five")], 400, "top_k must be an integer"),
    ("top_k with a digit separator", [img(png()), text("top_k", "1_0")], 400, "top_k must be an integer"),
    ("top_k in other digits", [img(png()), text("top_k", "\uff13")], 400, "top_k must be an integer"),
    ("unknown field", [img(png()), text("varient", "b0")], 400, r"unknown field\(s\) \['varient'\]"),
    ("two images to /classify", [img(png()), img(png())], 400, "use /classify_batch"),
    ("too many pixels", [img(huge_png(5000, 5000))], 413, "5000x5000 = 25,000,000 pixels"),
    ("body too large", [img(b"\xff\xd8" + b"0" * (1024 * 1024 + 10))], 413, "above the limit of 1,048,576 bytes"),
    ("json, not multipart", None, 400, "send multipart/form-data"),
]


def test_a_compressed_body_and_too_many_files_are_refused_by_name(server):
    import gzip

    files = {"image": ("a.png", png(), "image/png")}
    req = server.client.build_request("POST", "/classify", files=files)
    r = server.client.post("/classify", content=gzip.compress(req.read()),
                           headers={"content-type": req.headers["content-type"], "content-encoding": "gzip"})
    assert r.status_code == 415 and "not decompressed" in r.json()["error"]
    r = server.client.post("/classify_batch", files=[("images", ("a.png", png(), "image/png"))] * 40)
    assert r.status_code == 400 and "at most one for /classify and 8 for /classify_batch" in r.json()["error"]
    assert server.client.get("/readyz").status_code == 200


@pytest.mark.parametrize("method, path, allow", [("GET", "/classify", "POST"), ("PUT", "/classify_batch", "POST"),
                                                 ("DELETE", "/variants", "GET, HEAD"), ("POST", "/routes/fashion", "PATCH")])
def test_a_wrong_method_gets_our_json_error_naming_the_right_one(server, method, path, allow):
    r = server.client.request(method, path)
    assert r.status_code == 405 and r.headers["allow"] == allow
    assert r.json()["error"] == f"{method} is not allowed on {path}; use {allow}" and r.json()["request_id"]


@pytest.mark.parametrize("case, parts, status, message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_clear_4xx_and_the_server_stays_ready(server, case, parts, status, message):
    if parts is None:
        r = server.client.post("/classify", json={"image": "x"})
    else:
        r = server.client.post("/classify", files=parts)
    assert r.status_code == status, r.text
    body = r.json()
    assert re.search(message, body["error"]), body
    assert r.headers["x-request-id"] == body["request_id"]
    assert server.client.get("/readyz").status_code == 200


@pytest.mark.parametrize("size", [(60_000, 1), (2, 30_000)])
def test_a_strip_of_pixels_is_answered_like_any_image(server, size):
    # Valid, tiny in pixels and bytes, and decoded on the event loop: resized whole it took
    # gigabytes and stalled every other request (store.preprocess.MAX_ASPECT).
    data = png(size=size)
    r = classify(server, data, variant="lite0", top_k="12")
    assert r.status_code == 200, r.text
    want, _ = offline_scores(server, "lite0", data)
    got = {p["index"]: p["score"] for p in r.json()["predictions"]}
    assert np.allclose([got[i] for i in range(12)], want, atol=1e-4)
    assert server.client.get("/readyz").status_code == 200


@pytest.mark.parametrize("keep", [0.5, 60, -8])  # half the body, its first 60 bytes, all but the last 8
def test_an_interrupted_upload_is_named_as_such(server, keep):
    """A multipart body without its closing boundary (a client that stopped sending, a proxy that cut it)."""
    whole = (b"--zz\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
             b"Content-Type: image/png\r\n\r\n" + png() + b"\r\n--zz--\r\n")
    cut = whole[:int(len(whole) * keep)] if isinstance(keep, float) else whole[:keep]
    r = server.client.post("/classify", content=cut, headers={"content-type": "multipart/form-data; boundary=zz"})
    assert r.status_code == 400 and "does not end with its closing boundary" in r.json()["error"], r.text
    ok = server.client.post("/classify", content=whole, headers={"content-type": "multipart/form-data; boundary=zz"})
    assert ok.status_code == 200, ok.text


def test_classify_batch_fails_only_the_bad_item(server):
    files = [("images", ("a.png", png(seed=1), "image/png")), ("images", ("bad.jpg", b"garbage" * 20, "image/jpeg")),
             ("images", ("c.jpg", jpeg(seed=2), "image/jpeg")), ("images", ("empty.png", b"", "image/png"))]
    r = server.client.post("/classify_batch", files=files, data={"variant": "compact", "top_k": "2"})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["status"] for x in results] == [200, 400, 200, 400]
    assert [x["index"] for x in results] == [0, 1, 2, 3] and results[1]["filename"] == "bad.jpg"
    assert "not a supported image" in results[1]["error"] and "empty" in results[3]["error"]
    assert all(x["variant"] == "compact" and len(x["predictions"]) == 2 for x in results[::2])
    single = classify(server, jpeg(seed=2), variant="compact", top_k="2").json()["predictions"]
    assert [p["index"] for p in results[2]["predictions"]] == [p["index"] for p in single]


def test_variants_and_routes_describe_the_configuration(server):
    variants = {v["variant"]: v for v in server.client.get("/variants").json()["variants"]}
    assert set(variants) == {"b0", "mec", "compact", "lite0"}
    b0 = variants["b0"]
    assert b0["ready"] and b0["device"] == "cpu" and b0["weights"] == {"fashion": 0.5} and b0["params"] > 0
    assert variants["mec"]["shadow_in"] == ["fashion"] and variants["lite0"]["offline_top1"] == pytest.approx(0.14)
    for v in variants.values():  # which engine and precision serve, and why (the engines issue)
        assert v["precision"] in ("fp32", "bf16", "int8", "fp16") and v["engine_reason"], v
    text = server.client.get("/metrics").text
    assert metric(text, "effnet_variant_info", variant="b0", engine=b0["engine"], precision=b0["precision"]) == 1
    # Two lite0 processes, both loaded before /readyz said 200; CPU batches may run on one thread or on
    # all of them, one engine each.
    lite0 = variants["lite0"]
    assert lite0["workers"] == 2 and lite0["workers_loaded"] == 2 and lite0["ready"] and b0["workers"] == 1
    assert lite0["calls_in_flight"] == 4 and b0["calls_in_flight"] == 2  # gateway batching: 2 per process
    assert lite0["threads"] == 2 and set(lite0["engines_by_threads"]) == {"1", "2"}
    # Each process is its own worker service, and concurrent calls reach both (service.workers.worker_names)
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda i: classify(server, jpeg(seed=i), route="imagenet"), range(24)))
    assert all(r.status_code == 200 for r in answers)
    text = server.client.get("/metrics").text
    for name in ("effnet-worker-lite0-1", "effnet-worker-lite0-2"):  # batches by shared memory (service/shm.py)
        assert metric(text, "bentoml_service_request_total", service_name=name, endpoint="/predict_shared") > 0, name
        assert metric(text, "bentoml_service_request_total", service_name=name, endpoint="/predict") == 0, name
    assert lite0["worker_transport"] == b0["worker_transport"] == "shared_memory"
    assert metric(text, "effnet_worker_calls_total", variant="lite0", transport="shared_memory") >= 2
    assert metric(text, "effnet_worker_calls_total", variant="lite0", transport="http") == 0
    assert metric(text, "effnet_worker_calls_total", variant="compact") == 0  # in the gateway: no calls
    # compact runs in the gateway: no worker service of its own, the same description otherwise
    compact = variants["compact"]
    assert compact["placement"] == "gateway" and b0["placement"] == lite0["placement"] == "worker"
    assert compact["ready"] and compact["device"] == "cpu" and compact["calls_in_flight"] == 1
    assert compact["worker_transport"] == "in_process"
    assert set(compact["engines_by_threads"]) == {"1", "2"} and compact["engine_reason"]
    assert not (server.home / "run" / "ready" / "compact").exists()
    assert metric(text, "effnet_variant_ready", variant="compact") == 1
    routes = server.client.get("/routes").json()
    assert routes["default_route"] == "fashion" and routes["routes"]["fashion"]["shadow"]["variant"] == "mec"
    spec = server.client.get("/docs.json").json()  # the OpenAPI document behind /docs
    paths = spec["paths"]
    assert {"/classify", "/classify_batch", "/variants", "/routes", "/routes/{name}", "/assignment",
            "/readyz", "/livez", "/metrics"} <= set(paths)
    assert "image" in paths["/classify"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    # our own page: title, version and description, none of BentoML's placeholder
    from service.openapi import INFO

    assert spec["info"] == INFO and "contact" not in spec["info"]
    assert "BentoML" not in json.dumps(spec["info"]) and INFO["version"] not in ("None", "")
    docs = server.client.get("/docs", follow_redirects=True)  # the Swagger UI, where users look for it
    assert docs.status_code == 200 and "swagger-ui" in docs.text
    assert f"<title>{INFO['title']}</title>" in docs.text and "googletagmanager" not in docs.text
    assert server.client.get("/static_content/swagger-ui-bundle.js").status_code == 200  # what the page loads


def metric(text, name, **labels):
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_shadow_agreement_is_counted(server):
    for i in range(6):
        assert classify(server, png(seed=i), variant="b0").status_code == 200
    deadline = time.monotonic() + 60  # mirrored calls finish after the answers: wait for them
    while time.monotonic() < deadline:
        text = server.client.get("/metrics").text
        counted = sum(metric(text, "effnet_shadow_requests_total", route="fashion", variant="mec", primary="b0",
                             result=res) for res in ("agree", "disagree"))
        if counted >= 6:
            break
        time.sleep(0.5)
    assert counted >= 6, [line for line in text.splitlines() if "shadow" in line]


def test_metrics_are_labelled_per_variant(server):
    for v in ("b0", "mec", "compact", "lite0"):
        assert classify(server, png(seed=5), variant=v).status_code == 200
    assert classify(server, png(seed=6)).json()["assignment"] == "split"  # so that this test runs alone too
    assert classify(server, b"garbage" * 9).status_code == 400
    text = server.client.get("/metrics").text
    for v in ("b0", "mec", "compact", "lite0"):
        assert metric(text, "effnet_requests_total", variant=v, status="200") >= 1, v
        assert metric(text, "effnet_inference_duration_seconds_count", variant=v) >= 1, v
        assert metric(text, "effnet_batch_size_count", variant=v) >= 1, v
        assert metric(text, "effnet_queue_wait_seconds_count", variant=v) >= 1, v
        assert metric(text, "effnet_top1_score_count", variant=v) >= 1, v
        assert metric(text, "effnet_request_duration_seconds_count", variant=v) >= 1, v
        assert metric(text, "effnet_variant_info", variant=v) == 1, v
        assert metric(text, "effnet_variant_ready", variant=v) == 1, v
    assert metric(text, "effnet_split_assignments_total", route="fashion", assignment="split") >= 1
    assert metric(text, "effnet_requests_total", status="400") >= 1
    assert "bentoml_service_request_total" in text  # BentoML's own series are still there
    # every process froze its start-up objects once ready (service/heap.py), with a full collection first
    # that its collector watch has seen (moved to the histogram each second)
    # (compact runs in the gateway's process here; lite0 has two worker processes)
    for process in ("effnet-gateway", "effnet-worker-b0", "effnet-worker-mec", "effnet-worker-lite0-1",
                    "effnet-worker-lite0-2"):
        assert metric(text, "effnet_gc_frozen_objects", process=process) > 10_000, process
    deadline = time.monotonic() + 5
    while metric(text, "effnet_gc_pause_seconds_count", process="effnet-gateway", generation="2") < 1:
        assert time.monotonic() < deadline, [line for line in text.splitlines() if "effnet_gc" in line]
        time.sleep(0.2)
        text = server.client.get("/metrics").text
    assert metric(text, "effnet_gc_pause_seconds_count", variant="b0", generation="2") >= 1


def test_32_concurrent_clients_get_no_failures(server):
    """Catches dropped gateway->worker calls (bentoml 1.4.31-1.4.40) and batcher 503s at this load."""
    images = [png(seed=i) for i in range(8)] + [jpeg(seed=i) for i in range(8)]
    statuses, lock = [], threading.Lock()

    def client(c):
        with httpx.Client(base_url=server.url, timeout=120) as http:
            for i in range(10):
                kw = {"route": "imagenet"} if (c + i) % 4 == 0 else {}
                r = http.post("/classify", files={"image": ("x", images[(c + i) % 16])}, data=kw,
                              headers={"X-Client-Id": f"c{c}"})
                with lock:
                    statuses.append((r.status_code, r.text[:200] if r.status_code != 200 else ""))

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(client, range(32)))
    failures = [s for s in statuses if s[0] != 200]
    assert len(statuses) == 320 and not failures, failures[:5]
    assert server.client.get("/readyz").status_code == 200


@pytest.mark.skipif(not __import__("shutil").which("wrk"), reason="wrk is not installed (make setup installs it)")
def test_the_benchmarks_wrk_generator_counts_answers_by_status(server):
    """The serving benchmark's load generator: its forms are ones the gateway accepts, and refusals are counted
    as such, not as throughput."""
    from benchmarks.serve_bench import load_wrk

    good = load_wrk(server.url, [png(seed=i) for i in range(3)], 4, 1, {"route": "fashion", "variant": "mec"})
    assert set(good["statuses"]) == {"200"} and good["ok"] > 10, good
    assert good["p50_ms"] <= good["p99_ms"] <= good["max_ms"] and good["generator"] == "wrk"
    bad = load_wrk(server.url, [b"not an image"], 2, 1, {"route": "fashion"})
    assert set(bad["statuses"]) == {"400"} and bad["ok"] == 0 and bad["req_per_s"] == 0, bad
    assert server.client.get("/readyz").status_code == 200


def test_the_server_keeps_its_temporary_files_in_a_folder_of_its_store(server):
    """BentoML's clients between services leave a temporary folder each when stopped by a signal;
    they go to one folder per store, which the next start empties, instead of piling up in /tmp."""
    from cli.serve import server_env, server_tmp_dir

    assert any(server_tmp_dir(server.home).glob("bentoml-client-*"))
    other = server.home.parent / "other-store"
    first = Path(server_env(other)["TMPDIR"])
    (first / "bentoml-client-stale").mkdir()
    env = server_env(other)
    assert env["TMPDIR"] == str(first) and env["BENTOML_HOME"] == str(other.resolve())
    assert first.name.startswith("effnet-serve-") and not any(first.iterdir())
    assert not env["TORCHINDUCTOR_CACHE_DIR"].startswith(str(first))  # compiled graphs outlive the litter
    first.rmdir()


def test_a_route_change_moves_live_traffic_and_shows_in_routes_and_metrics(server):
    from service import audit

    state = server.home / "effnet-state"  # made by cli.serve.server_env, with the admin token's file in it
    token = audit.token_path(state).read_text().strip()
    http, before = server.client, server.client.get("/routes").json()["routes"]["fashion"]
    admin = {"Authorization": f"Bearer {token}"}
    try:
        r = http.patch("/routes/fashion", json={"split": {"b0": 1}})
        assert r.status_code == 401 and "Authorization: Bearer" in r.json()["error"]
        r = http.patch("/routes/fashion", json={"split": {"b0": 1}}, headers={**admin, "Host": "rebound.example"})
        assert r.status_code == 403 and "Host" in r.json()["error"]
        r = http.patch("/routes/fashion", json={"split": {"compact": 1, "b0": 0}}, headers=admin)
        assert r.status_code == 200, r.text
        assert r.json()["split"] == {"compact": 1.0, "b0": 0.0} and r.json()["previous"]["split"] == before["split"]
        saved = Path(r.json()["saved_in"])  # kept for the next start (restarts: tests/service/test_live_routes.py)
        assert saved.is_file() and saved.is_relative_to(server.home.resolve())
        assert http.get("/routes").json()["routes"]["fashion"]["changed_at"] == json.loads(saved.read_text())[
            "routes"]["fashion"]["changed_at"]
        answers = [classify(server, png(seed=i)).json() for i in range(12)]
        assert {(a["variant"], a["assignment"]) for a in answers} == {("compact", "default")}
        assert http.get("/routes").json()["routes"]["fashion"]["split"] == {"compact": 1.0, "b0": 0.0}
        assert http.get("/assignment", params={"client_id": "anyone"}).json()["variant"] == "compact"
        text = http.get("/metrics").text
        assert re.search(r'effnet_split_weight\{route="fashion",variant="compact"\} 1\.0', text)
        assert re.search(r'effnet_split_weight\{route="fashion",variant="mec"\} 0\.0', text)
        r = http.patch("/routes/fashion", content=b"{not json", headers={"content-type": "application/json", **admin})
        assert r.status_code == 400 and "not JSON" in r.json()["error"]
        r = http.patch("/routes/fashion", json={"split": {"lite0": 1, "b0": 1, "compact": 1}}, headers=admin)
        assert r.status_code == 400 and "lite0" in r.json()["error"] and "classes" in r.json()["error"]
    finally:
        r = http.patch("/routes/fashion", json={"split": before["split"], "shadow": before["shadow"]}, headers=admin)
        assert r.status_code == 200 and r.json()["split"] == before["split"]
        entries = [e for e in audit.read(audit.audit_path(state)) if e["route"] == "fashion"]
        assert [e["result"]["status"] for e in entries][:5] == [401, 403, 200, 400, 400]
        assert entries[2]["after"]["split"] == {"compact": 1.0, "b0": 0.0} and entries[2]["before"]["split"]
        assert entries[2]["token"] == audit.fingerprint(token) and entries[0]["token"] is None
        assert entries[2]["client"] == "127.0.0.1" and token not in audit.audit_path(state).read_text()
        assert r.json()["changed_at"] is None and not Path(r.json()["saved_in"]).exists()  # as the file: forgotten


def test_the_gateway_reports_requests_in_progress(server):
    text = server.client.get("/metrics").text
    for state in ("uploading", "processing", "decode_waiting"):
        if state != "decode_waiting":  # appears once an image has waited for decoding room
            assert re.search(rf'effnet_gateway_requests\{{state="{state}"\}} 0\.0', text), state


def test_after_sigterm_the_gateway_stops_by_itself_though_clients_left_before_their_answers(server):
    """Last, as it stops the module's server: requests their clients left unanswered do not outlive the drain."""
    for i in range(4):
        first, rest = _multipart_head(server.port, png(seed=i))
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(first if i % 2 else first + rest)
    deadline = time.monotonic() + 30  # a wait: the gateway has seen the four clients leave before the signal
    while time.monotonic() < deadline and sum(metric(server.client.get("/metrics").text, "effnet_gateway_requests",
                                                     state=state) for state in ("uploading", "processing")):
        time.sleep(0.1)
    server.stop()
    log = server.log.read_text()  # not ended by the harness's SIGKILL, nor by the drain's watchdog (no last word)
    assert not server.killed and server.proc.returncode == 0 and re.search(r"gateway \d+: shut down", log), log[-3000:]
