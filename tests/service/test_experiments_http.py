"""An experiment through a real `bentoml serve`: answers recorded, feedback taken and committed, results per
variant against the control, bad feedback refused, and every acknowledged feedback kept when the gateway
process is killed and restarted by BentoML."""
from __future__ import annotations

import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from service.audit import ensure_token_file
from store.paths import state_dir
from tests.support.serving import FASHION_CLASSES, Server, make_checkpoint, write_config

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("experiments") / "bentoml"
    for name, variant, seed in (("b0-fashion-mnist", "b0", 1), ("mec-out-e3-fashion-mnist", "mec-out-e3", 2),
                                ("compact-fashion-mnist", "compact", 3)):
        make_checkpoint(home, name, variant, FASHION_CLASSES, 32, grayscale=True, seed=seed)
    cfg = write_config(home.parent / "serve.yaml", {
        "server": {"cpu_threads": 2},
        "default_route": "fashion",
        "variants": {
            "b0": {"model": "b0-fashion-mnist:latest", "engine": "torch"},
            "mec": {"model": "mec-out-e3-fashion-mnist:latest", "engine": "torch"},
            # in the gateway's process: no worker to start, and a shadow all the same
            "compact": {"model": "compact-fashion-mnist:latest", "engine": "torch", "placement": "gateway"},
        },
        "routes": {"fashion": {"split": {"b0": 0.5, "mec": 0.5}, "control": "b0",
                               "shadow": {"variant": "compact", "fraction": 1.0}},
                   "plain": {"split": {"mec": 1}},
                   # a bandit that recomputes every second (30 s by default)
                   "bandit": {"split": {"b0": 0.5, "mec": 0.5}, "control": "b0",
                              "policy": {"bandit": {"floor": 0.1, "every_s": 1}}}},
    })
    # The bandit route makes feedback an admin's act (server.feedback_auth: auto): the server reads this
    # token file from its state folder, and the test's client sends it.
    token = ensure_token_file(state_dir(home)).read_text().strip()
    with Server(home, cfg) as s:
        s.wait("/readyz")
        s.client = httpx.Client(base_url=s.url, timeout=60, headers={"Authorization": f"Bearer {token}"})
        yield s
        s.client.close()


def _png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (28, 28), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _answer(server, variant: str, seed: int) -> dict:
    r = server.client.post("/classify", files={"image": ("x.png", _png(seed), "image/png")},
                           data={"variant": variant, "route": "fashion"})
    assert r.status_code == 200, r.text
    return r.json()


def _row(result: dict, variant: str, role: str) -> dict:
    return next(v for v in result["variants"] if v["variant"] == variant and v["role"] == role)


def test_feedback_is_counted_per_variant_and_against_the_control(server):
    script = {"b0": [True, True, False, True], "mec": [True, False, False]}  # is the label the answer's top-1?
    given = {}
    for variant, rights in script.items():
        for k, right in enumerate(rights):
            a = _answer(server, variant, seed=100 * len(variant) + k)
            top = a["predictions"][0]["index"]
            label = top if right else (top + 1) % len(FASHION_CLASSES)
            # a name for some, an index for the others: both are the class
            sent = FASHION_CLASSES[label] if k % 2 else label
            r = server.client.post("/feedback", json={"request_id": a["request_id"], "label": sent})
            assert r.status_code == 200, r.text
            assert r.json()["correct"] is right and r.json()["variant"] == variant
            given[a["request_id"]] = label
    result = server.client.get("/experiments/fashion").json()
    assert result["control"] == "b0" and result["status"] == "collecting"  # far below the 100 labels it needs
    b0, mec = _row(result, "b0", "control"), _row(result, "mec", "treatment")
    assert (b0["labelled"], b0["correct"]) == (4, 3) and (mec["labelled"], mec["correct"]) == (3, 1)
    assert b0["requests"] >= 4 and b0["accuracy"] == 0.75
    lo, hi = b0["accuracy_95"]
    assert 0 < lo < 0.75 < hi <= 1
    assert mec["vs_control"]["status"] == "collecting" and mec["vs_control"]["difference"] == pytest.approx(1 / 3 - 3 / 4)
    shadow = _row(result, "compact", "shadow")  # every answer was mirrored to compact and labelled with it
    deadline = time.monotonic() + 10
    while shadow["labelled"] < 7 and time.monotonic() < deadline:
        time.sleep(0.3)
        shadow = _row(server.client.get("/experiments/fashion").json(), "compact", "shadow")
    assert shadow["labelled"] <= 7 and shadow["requests"] >= shadow["labelled"]
    metrics = server.client.get("/metrics").text
    assert 'effnet_feedback_total{correct="true",route="fashion",variant="b0"} 3.0' in metrics
    assert server.client.get("/experiments").json()["experiments"]["fashion"]["control"] == "b0"
    server.given = given


@pytest.mark.parametrize("body, status, words", [
    ({"request_id": "0" * 32, "label": 1}, 404, "no answered request"),
    ({"request_id": "x", "label": "Dragon"}, 400, "unknown class"),
    ({"request_id": "x", "label": 99}, 400, "outside the classes"),
    ({"request_id": "x", "label": True}, 400, "class name or index"),
    ({"request_id": "x"}, 400, "request_id"),
    ({"request_id": "x", "label": 1, "extra": 2}, 400, "request_id"),
    ([1, 2], 400, "feedback"),
    ({"feedback": []}, 400, "feedback"),
])
def test_bad_feedback_gets_a_clear_4xx_and_changes_nothing(server, body, status, words):
    before = server.client.get("/experiments/fashion").json()
    r = server.client.post("/feedback", json=body)
    assert r.status_code == status and words in r.json()["error"], r.text
    assert server.client.get("/experiments/fashion").json()["variants"] == before["variants"]


def test_feedback_that_is_not_json_duplicated_or_on_a_route_without_experiment_is_refused(server):
    r = server.client.post("/feedback", content=b"label=3", headers={"Content-Type": "text/plain"})
    assert r.status_code == 400 and "not JSON" in r.json()["error"]
    a = _answer(server, "b0", seed=7)
    assert server.client.post("/feedback", json={"request_id": a["request_id"], "label": 2}).status_code == 200
    r = server.client.post("/feedback", json={"request_id": a["request_id"], "label": 3})
    assert r.status_code == 409 and "label 2" in r.json()["error"]
    assert server.client.get("/experiments/plain").status_code == 404
    assert server.client.get("/experiments/nowhere").status_code == 404


def test_feedback_that_moves_traffic_needs_the_admin_token(server):
    """A route has a policy, so feedback steers traffic: without the token, or with a Host that is not
    this server's, it is refused and nothing is recorded."""
    a = _answer(server, "b0", seed=9)
    body = {"request_id": a["request_id"], "label": 0}
    r = httpx.post(server.url + "/feedback", json=body)
    assert r.status_code == 401 and "Authorization" in r.json()["error"]
    r = httpx.post(server.url + "/feedback", json=body, headers={**server.client.headers, "Host": "evil.example"})
    assert r.status_code == 403 and "Host" in r.json()["error"]
    assert server.client.post("/feedback", json=body).status_code == 200  # not taken before: not a 409


def test_a_batch_of_feedback_answers_each_item(server):
    a = _answer(server, "mec", seed=8)
    r = server.client.post("/feedback", json={"feedback": [
        {"request_id": a["request_id"], "label": 0}, {"request_id": "f" * 32, "label": 0},
        {"request_id": a["request_id"], "label": "bogus"}]})
    assert r.status_code == 200, r.text
    assert [x["status"] for x in r.json()["results"]] == [200, 404, 400]


def test_a_bandit_route_moves_its_split_to_the_variant_feedback_shows_right_and_audits_it(server):
    import json

    for k in range(12):
        for variant, right in (("b0", False), ("mec", True)):
            r = server.client.post("/classify", files={"image": ("x.png", _png(500 + k), "image/png")},
                                   data={"variant": variant, "route": "bandit"})
            top = r.json()["predictions"][0]["index"]
            label = top if right else (top + 1) % len(FASHION_CLASSES)
            assert server.client.post("/feedback", json={"request_id": r.json()["request_id"],
                                                         "label": label}).status_code == 200
    deadline, split = time.monotonic() + 20, {}
    while time.monotonic() < deadline:
        split = server.client.get("/routes").json()["routes"]["bandit"]["split"]
        if split["mec"] > 0.8:
            break
        time.sleep(0.5)
    assert split["mec"] > 0.8 and split["b0"] >= 0.1 - 1e-6, split
    route = server.client.get("/routes").json()["routes"]["bandit"]
    assert route["policy"] == {"bandit": {"floor": 0.1, "every_s": 1.0, "cost_per_ms": 0.0}}
    assert route["changed_at"] is not None
    audits = [json.loads(line) for f in server.home.rglob("audit.jsonl") for line in f.read_text().splitlines()]
    mine = [a for a in audits if a.get("client") == "policy:bandit" and a.get("route") == "bandit"]
    assert mine and mine[-1]["before"]["split"]["mec"] < mine[-1]["after"]["split"]["mec"]


def test_effnet_experiment_prints_the_experiments_and_draws_them(server, tmp_path, capsys):
    from cli.main import main

    assert main(["experiment", "fashion", "--url", server.url, "--png", str(tmp_path / "fashion.png")]) == 0
    out = capsys.readouterr().out
    assert "route fashion: control b0, status collecting" in out
    assert any(line.split()[:2] == ["b0", "control"] for line in out.splitlines())
    assert any(line.split()[:2] == ["mec", "treatment"] and "collecting:" in line for line in out.splitlines())
    assert (tmp_path / "fashion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the chart's second panel: the history, cumulative, ending at the counts of the table
    a = _answer(server, "mec", seed=7)
    assert server.client.post("/feedback", json={"request_id": a["request_id"], "label": 0}).status_code == 200
    body = httpx.get(server.url + "/experiments/fashion?history=1").json()
    served = [v for v in body["variants"] if v["labelled"] and v["role"] != "shadow"]
    assert served
    for v in served:
        last = body["history"][v["variant"]][-1]
        assert (last["labelled"], last["correct"]) == (v["labelled"], round(v["accuracy"] * v["labelled"]))
    assert "history" not in httpx.get(server.url + "/experiments/fashion").json()
    bad = httpx.get(server.url + "/experiments/fashion?history=maybe")
    assert bad.status_code == 400 and "history must be 1 or 0" in bad.json()["error"]
    assert main(["experiment", "plain", "--url", server.url]) == 2
    assert "runs no experiment" in capsys.readouterr().err


def test_acknowledged_feedback_survives_a_killed_gateway(server):
    """kill -9 of the gateway process (BentoML starts another): every feedback it acknowledged is there."""
    from loadtest.chaos_faults import gateway_pids, send
    import signal

    before = server.client.get("/experiments/fashion").json()
    labelled = {v["variant"] + v["role"]: v["labelled"] for v in before["variants"]}
    assert labelled["b0control"] >= 4
    pids = gateway_pids(server.proc.pid)
    assert pids and all(send(p, signal.SIGKILL) for p in pids)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            r = server.client.get("/experiments/fashion", timeout=5)
            if r.status_code == 200 and set(gateway_pids(server.proc.pid)) - set(pids):
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    after = {v["variant"] + v["role"]: v["labelled"] for v in r.json()["variants"]}
    assert after == labelled
