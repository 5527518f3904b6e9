"""Load-test parts that need no service: images, answer checks, catalog parsing, config, analysis."""
import io
import json
import random

import numpy as np
import pytest
from PIL import Image

from loadtest.analysis import latency_disagreement, summarise
from loadtest.images import BAD_KINDS, PHOTO_LABELS, bad_input, dataset_for, fashion_mnist, photos
from loadtest.checks import check_answer
from loadtest.prometheus import loopback_target, scrape_config
from loadtest.report import _pareto, compare, markdown
from loadtest.service_api import parse_routes, parse_variants


def test_fashion_mnist_pngs_hold_the_test_set_pixels_and_labels():
    images = fashion_mnist(20)
    assert len(images) == 20 and images[0].id == "fashion-mnist/0"
    img = Image.open(io.BytesIO(images[0].data))
    assert img.format == "PNG" and img.mode == "L" and img.size == (28, 28)
    # The first test image is an ankle boot (9) and the second a pullover (2), per Zalando's README.
    assert images[0].labels == {9} and images[1].labels == {2}
    assert np.asarray(img).max() > 100  # real pixels, not an empty canvas


def test_photo_labels_are_the_imagenet_classes_they_name():
    from models.pretrained import imagenet_classes

    names = imagenet_classes()
    for accepted in PHOTO_LABELS.values():
        for index, name in accepted:
            assert names[index] == name
    by_id = {p.id: p for p in photos()}
    assert by_id["photos/coffee"].labels == {967} and not by_id["photos/astronaut"].labelled


def test_broken_uploads_are_refused_by_the_services_decoder():
    from service.images import ImageError, decode_image

    rng = random.Random(0)
    good = fashion_mnist(1)[0]
    for kind in BAD_KINDS:
        data, _, _ = bad_input(kind, rng, good)
        with pytest.raises(ImageError) as e:
            decode_image(data, max_pixels=10**8)
        assert 400 <= e.value.status < 500


def test_dataset_for_picks_images_by_dataset_then_classes():
    assert dataset_for("fashion-mnist") == "fashion-mnist"
    assert dataset_for("fake", 1000) == "photos"
    assert dataset_for(None, None, "imagenet") == "photos"
    with pytest.raises(ValueError):
        dataset_for("cifar", 100, "other")


ANSWER = {"request_id": "r", "route": "fashion", "variant": "b0", "model": "b0:1", "assignment": "explicit",
          "latency_ms": 3.0, "predictions": [{"label": "Bag", "index": 8, "score": 0.9},
                                            {"label": "Coat", "index": 4, "score": 0.1}]}


def test_check_answer_accepts_a_good_answer_and_names_what_is_wrong():
    ok = dict(variant="b0", route=None, assignment="explicit", top_k=5, known_variants={"b0", "mec"})
    assert check_answer(ANSWER, **ok) is None
    assert "missing" in check_answer({k: v for k, v in ANSWER.items() if k != "model"}, **ok)
    assert "asked for mec" in check_answer(ANSWER, **{**ok, "variant": "mec"})
    assert "highest first" in check_answer({**ANSWER, "predictions": ANSWER["predictions"][::-1]}, **ok)
    assert "predictions" in check_answer({**ANSWER, "predictions": ANSWER["predictions"]}, **{**ok, "top_k": 1})
    assert "unknown variant" in check_answer({**ANSWER, "variant": "x"}, **{**ok, "variant": None})


def test_catalog_parsing_of_the_services_answers():
    variants = parse_variants({"variants": [
        {"variant": "b0", "model": "b0:1", "routes": ["fashion"], "weights": {"fashion": 0.5}, "dataset": "fashion-mnist",
         "num_classes": 10, "params": 4, "macs": 5, "offline_top1": 0.9},
        {"variant": "mec", "model": "mec:1", "routes": ["fashion"], "weights": {"fashion": 0.5}, "num_classes": 10,
         "dataset": "fashion-mnist", "offline_top1": 0.8},
        {"variant": "lite0", "model": "l:1", "routes": ["imagenet"], "weights": {"imagenet": 1.0}, "num_classes": 1000,
         "dataset": "imagenet"}]})
    assert variants["b0"]["route"] == "fashion" and variants["b0"]["top1"] == 0.9 and variants["b0"]["weight"] == 0.5
    routes, default = parse_routes({"default_route": "fashion", "routes": {
        "fashion": {"split": {"b0": 0.5, "mec": 0.5}, "shadow": {"variant": "mec", "fraction": 0.2}},
        "imagenet": {"split": {"lite0": 1.0}, "shadow": None}}}, variants)
    assert default == "fashion" and routes["fashion"]["weights"] == {"b0": 0.5, "mec": 0.5}
    assert routes["fashion"]["shadow"] == "mec" and routes["fashion"]["shadow_fraction"] == 0.2


def test_prometheus_config_scrapes_loopback_only():
    assert loopback_target("http://127.0.0.1:3000") == "127.0.0.1:3000"
    with pytest.raises(ValueError):
        loopback_target("http://example.com:3000")
    text = scrape_config({"effnet": "127.0.0.1:3000"}, 1.0)
    assert "scrape_interval: 1000ms" in text and '"127.0.0.1:3000"' in text


def test_pareto_front_and_latency_tolerance():
    pts = [(10, 90, "a"), (20, 95, "b"), (30, 93, "c"), (5, 80, "d")]
    assert [p[2] for p in _pareto(pts, lower_x_better=True)] == ["d", "a", "b"]
    assert [p[2] for p in _pareto(pts, lower_x_better=False)] == ["b", "c"]
    assert not latency_disagreement(100, 110) and latency_disagreement(100, 300)


def _fake_results(name, p50_ms, correct):
    """A results.json as a run writes it, with one variant and one step."""
    step = {"phase": "b0", "kind": "variant", "route": "fashion", "users": 4, "t0": 0, "t1": 10, "load_s": 10,
            "cpu": {"service_s": 5, "locust_s": 2, "wall_s": 10, "cores": 2},
            "stats": {"classify b0": {"count": 100, "failures": 0, "p50_ms": p50_ms + 2, "p95_ms": 30, "p99_ms": 40,
                                      "rps": 10.0}},
            "tally": {"variants": {"b0": {"by_image": {"fashion-mnist/0": {"9": correct, "1": 100 - correct}}}}},
            "prometheus": {"all": {"requests": 100}, "b0": {
                "requests": 100, "ok": 100, "refused": 0, "errors": 0, "error_rate": 0.0, "throughput": 10.0,
                "latency_s": {"p50": p50_ms / 1000, "p95": 0.03, "p99": 0.04}, "batch_size_mean": 1.5}}}
    return {"run": name, "date": "2026-11-26T00:00:00+00:00", "config": {"steps": [4], "slo_ms": 250, "step_s": 10,
            "fashion_images": 1}, "machine": {"cpu": "test", "cores": 2},
            "variants": {"b0": {"route": "fashion", "model": "b0:1", "dataset": "fashion-mnist", "num_classes": 10,
                                "params": 4_000_000, "macs": 8_000_000, "top1": 0.9}},
            "offline_top1": {"b0": {"fashion-mnist/0": 9}}, "steps": [step]}


def test_summary_counts_accuracy_against_offline_and_compare_shows_the_change(tmp_path):
    for name, p50, correct in (("a", 10, 100), ("b", 20, 90)):
        r = _fake_results(name, p50, correct)
        r["summary"] = summarise(r)
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(r))
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    acc = a["summary"]["variants"]["b0"]["accuracy"]
    assert acc["under_load"] == acc["offline_same_images"] == 1.0 and acc["answers_differing_from_offline"] == 0
    assert a["summary"]["variants"]["b0"]["best_within_slo"]["throughput"] == 10.0
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert b["summary"]["variants"]["b0"]["accuracy"]["answers_differing_from_offline"] == 10
    assert "| **b0** |" in markdown(a)
    text = compare(tmp_path / "a", tmp_path / "b")
    assert "| b0 | p50 ms @4 | 10.0 | 20.0 | +100.0% |" in text


@pytest.mark.parametrize("argv, message", [
    (["--name", "../../etc"], "a run name is letters"),  # wrote the report outside the repository
    (["--name", ""], "a run name is letters"),
    (["--step-seconds", "0"], "expected 1..600 s, got 0"),
    (["--slo-ms", "-5"], "expected 1..60000 ms"),
    (["--fashion-images", "0"], "expected 1..10000"),
    (["--bad-share", "0.9"], "expected 0..0.5"),
    (["--scrape-interval", "nan"], "expected 0.1..60 s"),
    (["--max-seconds", "0"], "expected 11..3600 s"),
    (["--steps", "4,0"], "each step (concurrent users) is 1..256"),
])
def test_loadtest_options_out_of_range_are_refused_before_anything_starts(argv, message, capsys):
    import argparse

    from cli.loadtest import add_commands

    parser = argparse.ArgumentParser(prog="effnet")
    add_commands(parser.add_subparsers())
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["loadtest", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_loadtest_against_a_url_where_nothing_listens_says_so_and_writes_nothing(tmp_path):
    import socket

    from loadtest.run import RunConfig, execute

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = RunConfig(url=f"127.0.0.1:{port}", reports_dir=str(tmp_path / "reports"), ready_timeout_s=1.0)
    with pytest.raises(ValueError, match=f"no ready service: http://127.0.0.1:{port} not ready"):
        execute(cfg, log=lambda m: None)
    assert not (tmp_path / "reports").exists()


def test_an_encoded_image_set_is_kept_for_the_next_process_of_the_run(tmp_path, monkeypatch):
    from store import fashion_mnist as dataset

    if not dataset.available():
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    from loadtest import images

    monkeypatch.setenv(images.CACHE_ENV, str(tmp_path))
    images.fashion_mnist.cache_clear()
    first = images.fashion_mnist(50)
    assert (tmp_path / "fashion-mnist-50.npz").exists()
    images.fashion_mnist.cache_clear()  # as a new Locust process would: read back, byte for byte and label for label
    assert images.fashion_mnist(50) == first and first[7].labels == frozenset({int(dataset.load("test")[1][7])})
    images.fashion_mnist.cache_clear()
