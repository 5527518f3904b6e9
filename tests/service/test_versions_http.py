"""Versions live through a real `bentoml serve` (service/versions.py): under steady load on every route, a
newly trained checkpoint of compact is loaded while serving, takes 10% of compact's requests, is promoted,
then rolled back, with no failed request and every answer naming the version that produced it.

The load threads run for the whole test and are bounded in count and time. The 10% is checked over 2,000
answers against a binomial bound (3 points is 4.5 standard deviations at n = 2,000), not a timing."""
import base64
import concurrent.futures
import io
import itertools
import re
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.support.serving import FASHION_CLASSES, Server, make_checkpoint, write_config

pytestmark = pytest.mark.server

TOKEN = "versions-test-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def png(seed):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (28, 28), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


IMAGES = [png(i) for i in range(16)]


class Load:
    """Closed-loop clients on every route until stopped: every answer's status, variant and version."""

    def __init__(self, url, routes, per_route=2, most=20000, most_s=300):
        self.url, self.stop_at = url, time.monotonic() + most_s
        self.answers, self.lock, self.left = [], threading.Lock(), itertools.count(most, -1)
        self.running = True
        self.threads = [threading.Thread(target=self.run, args=(r,), daemon=True) for r in routes
                        for _ in range(per_route)]

    def run(self, route):
        with httpx.Client(base_url=self.url, timeout=60) as c:
            for i in itertools.count():
                if not self.running or time.monotonic() > self.stop_at or next(self.left) <= 0:
                    return
                try:
                    r = c.post("/classify", files={"image": ("x.png", IMAGES[i % 16], "image/png")},
                               data={"route": route})
                    body = r.json()
                    row = (route, r.status_code, body.get("variant"), body.get("version"), body.get("error"),
                           time.monotonic())
                except (httpx.HTTPError, ValueError) as e:
                    row = (route, type(e).__name__, None, None, str(e), time.monotonic())
                with self.lock:
                    self.answers.append(row)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        for t in self.threads:
            t.join(70)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    home = tmp_path_factory.mktemp("versions") / "bentoml"
    old = make_checkpoint(home, "compact-fashion-mnist", "compact", FASHION_CLASSES, 32, grayscale=True, seed=1)
    make_checkpoint(home, "b0-fashion-mnist", "b0", FASHION_CLASSES, 32, grayscale=True, seed=3)
    cfg = write_config(home.parent / "serve.yaml", {
        "server": {"cpu_threads": 2, "health_interval_s": 0.5},
        # a long queueing budget: the test is about versions, not load shedding on a busy machine
        "variants": {"compact": {"model": "compact-fashion-mnist:latest", "engine": "torch", "max_latency_ms": 20000},
                     "b0": {"model": "b0-fashion-mnist:latest", "engine": "torch", "placement": "gateway"}},
        "routes": {"fashion": {"split": {"compact": 1, "b0": 1}}, "compact": {"split": {"compact": 1}}},
    })
    import os

    os.environ["EFFNET_ADMIN_TOKEN"] = TOKEN
    try:
        with Server(home, cfg) as s:
            s.wait("/readyz")
            # trained while it serves: the same name, a later version; and a checkpoint of other classes
            new = make_checkpoint(home, "compact-fashion-mnist", "compact", FASHION_CLASSES, 32, grayscale=True, seed=2)
            other = make_checkpoint(home, "compact-digits", "compact", [str(i) for i in range(10)], 32, grayscale=True)
            s.client = httpx.Client(base_url=s.url, timeout=60)
            yield s, old, new, other
            s.client.close()
    finally:
        os.environ.pop("EFFNET_ADMIN_TOKEN", None)


def versions(s):
    return s.client.get("/variants/compact/versions").json()


def compact_answers(s, n, workers=8):
    def one(i):
        r = s.client.post("/classify", files={"image": ("x.png", IMAGES[i % 16], "image/png")},
                          data={"variant": "compact"})
        assert r.status_code == 200, r.text
        return r.json()["version"]

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, range(n)))


def test_a_version_loads_takes_its_canary_share_is_promoted_and_rolled_back_without_a_failed_request(served, capsys):
    s, old, new, other = served
    assert versions(s)["default"] == old
    with Load(s.url, ["fashion", "compact"]) as load:
        # refused without the token, and for a checkpoint of other classes
        assert s.client.post("/variants/compact/versions", json={"tag": new}).status_code == 401
        bad = s.client.post("/variants/compact/versions", json={"tag": other}, headers=ADMIN)
        assert bad.status_code == 409 and "classes differs" in bad.json()["error"]

        r = s.client.post("/variants/compact/versions", json={"tag": new, "share": 10}, headers=ADMIN)
        assert r.status_code == 202, r.text
        row = next(v for v in r.json()["versions"] if v["tag"] == new)
        assert row["state"] == "loading" and row["share"] == 0.1
        assert s.client.post("/variants/compact/versions", json={"tag": new}, headers=ADMIN).status_code == 409
        deadline = time.monotonic() + 180
        while next(v for v in versions(s)["versions"] if v["tag"] == new)["state"] != "ready":
            assert time.monotonic() < deadline, versions(s)
            time.sleep(0.5)

        # the Open Inference Protocol sees the version, and answers with it alone when named
        v2 = new.split(":")[1]
        assert v2 in s.client.get("/v2/models/compact").json()["versions"]
        assert s.client.get(f"/v2/models/compact/versions/{v2}/ready").status_code == 200
        image = {"name": "image", "datatype": "BYTES", "shape": [2],
                 "data": [base64.b64encode(IMAGES[0]).decode(), base64.b64encode(IMAGES[1]).decode()]}
        r = s.client.post(f"/v2/models/compact/versions/{v2}/infer", json={"inputs": [image]})
        assert r.status_code == 200 and r.json()["model_version"] == v2, r.text
        assert r.json()["parameters"]["versions"] == f"{new},{new}"
        assert s.client.post("/v2/models/compact/versions/nope/infer", json={"inputs": [image]}).status_code == 404

        seen = compact_answers(s, 2000)
        share = seen.count(new) / len(seen)
        assert set(seen) == {old, new} and abs(share - 0.10) <= 0.03, share
        row = next(v for v in s.client.get("/variants").json()["variants"] if v["variant"] == "compact")
        shown = {v["tag"]: v for v in row["versions"]}
        assert shown[new]["share"] == 0.1 and shown[new]["state"] == "ready" and shown[new]["images"] >= seen.count(new)
        assert shown[old]["default"] and shown[new]["offline_top1"] == pytest.approx(0.12)  # make_checkpoint: seed 2

        r = s.client.patch(f"/variants/compact/versions/{new.split(':')[1]}", json={"promote": True}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["default"] == new and r.json()["previous"] == old
        assert set(compact_answers(s, 60)) == {new}

        from cli.main import main  # the rollback as an operator does it

        assert main(["rollout", "compact", "--rollback", "--url", s.url, "--token", TOKEN]) == 0
        shown = capsys.readouterr().out
        assert re.search(rf"^{re.escape(old)} +ready +rest +yes$", shown, re.M), shown
        assert versions(s)["default"] == old and versions(s)["previous"] == new
        assert set(compact_answers(s, 60)) == {old}

        # the old default is unloaded only when it is no longer the default; then its workers go
        assert s.client.delete(f"/variants/compact/versions/{old}", headers=ADMIN).status_code == 409
        r = s.client.delete(f"/variants/compact/versions/{new}", headers=ADMIN)
        assert r.status_code == 202
        deadline = time.monotonic() + 60
        while len(versions(s)["versions"]) > 1:
            assert time.monotonic() < deadline, versions(s)
            time.sleep(0.5)
        assert set(compact_answers(s, 20)) == {old}
    failed = [a for a in load.answers if a[1] != 200]
    assert len(load.answers) > 100 and not failed, (len(load.answers), failed[:5])
    by_variant = {a[2:4] for a in load.answers}
    assert {v for _, v in by_variant} <= {old, new, *{v for k, v in by_variant if k == "b0"}}
    assert all(version for _, version in by_variant)  # every answer names its version
    assert any(v == new for k, v in by_variant if k == "compact")  # the load saw the new version too

    metrics = s.client.get("/metrics").text
    assert f'effnet_version_images_total{{variant="compact",version="{new}"}}' in metrics


def test_version_changes_are_refused_with_a_reason(served):
    s, old, new, other = served
    cases = [
        (s.client.patch, f"/variants/compact/versions/{old}", {"share": 10}, 409, "default"),
        (s.client.patch, "/variants/compact/versions/nope", {"share": 10}, 404, "no version"),
        (s.client.patch, f"/variants/compact/versions/{old}", {"share": 150}, 400, "percentage"),
        (s.client.patch, f"/variants/compact/versions/{old}", {"colour": 1}, 400, "share"),
        (s.client.post, "/variants/nope/versions", {"tag": new}, 404, "unknown variant"),
        (s.client.post, "/variants/compact/versions", {"tag": "missing:v1"}, 409, "cannot be a version"),
        (s.client.post, "/variants/compact/versions", {"share": 10}, 400, "tag"),
    ]
    for call, path, body, status, says in cases:
        r = call(path, json=body, headers=ADMIN)
        assert r.status_code == status and says in r.json()["error"], (path, body, r.status_code, r.text)
    r = s.client.post("/variants/compact/versions", content=b"{not json", headers=ADMIN)
    assert r.status_code == 400 and "not JSON" in r.json()["error"]
