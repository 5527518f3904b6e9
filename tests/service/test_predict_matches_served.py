"""`effnet predict` answers a file as a real `bentoml serve` answers POST /classify: the same top-k classes
and scores (the manifest's temperature applied on both sides), and the same refusal for a broken file."""
from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from cli.main import main as effnet
from loadtest.images import fashion_mnist, photos
from store import read_manifest
from tests.support.serving import FASHION_CLASSES, Server, make_checkpoint, write_config

pytestmark = pytest.mark.server

# Above 1, so a side that forgot the temperature would answer other scores (the top-k stays the same).
TEMPERATURE = 1.7


def _encode(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def _files() -> dict[str, bytes]:
    """The files both sides answer: what clients send, in the modes the decoder treats differently."""
    photo = next(p for p in photos() if p.id == "photos/rocket")  # a real camera JPEG, decoded at a reduced scale
    scene = Image.open(io.BytesIO(photo.data)).convert("RGB").resize((160, 120))
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees: both sides must turn it upright
    gray = np.random.default_rng(5).integers(0, 255, (50, 70), dtype=np.uint8)
    return {
        "rocket.jpg": photo.data,
        "fashion-mnist.png": fashion_mnist(1)[0].data,
        "gray.png": _encode(Image.fromarray(gray), "PNG"),
        "cmyk.jpg": _encode(scene.convert("CMYK"), "JPEG"),
        "rotated.jpg": _encode(scene, "JPEG", exif=exif),
    }


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    files = _files()
    home = tmp_path_factory.mktemp("predict") / "bentoml"
    # BatchNorm statistics from these very files: each gets a decisive answer, so no rounding can swap two classes
    tag = make_checkpoint(home, "compact-fashion-mnist", "compact", FASHION_CLASSES, 48, grayscale=True,
                          calibrate_on=list(files.values()))
    path = read_manifest(tag, home)[1] / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "temperature": TEMPERATURE}))
    cfg = write_config(home.parent / "serve.yaml", {
        "server": {"cpu_threads": 1},
        "default_route": "fashion",
        "variants": {"compact": {"model": tag, "engine": "torch"}},
        "routes": {"fashion": {"split": {"compact": 1}}},
    })
    folder = tmp_path_factory.mktemp("files")
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "cut.jpg").write_bytes(files["rotated.jpg"][: len(files["rotated.jpg"]) // 2])
    with Server(home, cfg) as s:
        s.wait("/readyz")
        s.client = httpx.Client(base_url=s.url, timeout=60)
        s.tag, s.folder = tag, folder
        yield s
        s.client.close()


def _predict(served, capsys, monkeypatch, top_k: int) -> dict[str, dict]:
    monkeypatch.setenv("BENTOML_HOME", str(served.home))
    code = effnet(["predict", served.tag, str(served.folder), "--json", "--top-k", str(top_k)])
    out = json.loads(capsys.readouterr().out)
    assert code == 1  # cut.jpg is not answered
    return {a["file"].rsplit("/", 1)[-1]: a for a in out}


def test_predict_gives_the_served_top_k_and_scores_for_every_file(served, capsys, monkeypatch):
    top_k = 5
    offline = _predict(served, capsys, monkeypatch, top_k)
    assert set(offline) == {*_files(), "cut.jpg"}
    for name in _files():
        r = served.client.post("/classify", files={"image": (name, (served.folder / name).read_bytes())},
                               data={"top_k": str(top_k)})
        assert r.status_code == 200, r.text
        online = r.json()["predictions"]
        got = offline[name]["predictions"]
        assert [p["index"] for p in got] == [p["index"] for p in online], name
        assert [p["label"] for p in got] == [p["label"] for p in online], name
        np.testing.assert_allclose([p["score"] for p in got], [p["score"] for p in online], atol=1e-4, err_msg=name)
    # the temperature is applied: the scores are not the network's plain softmax, which is sharper at T > 1
    assert max(a["predictions"][0]["score"] for a in offline.values() if "predictions" in a) < 1.0


def test_a_broken_file_is_refused_offline_with_the_services_words(served, capsys, monkeypatch):
    offline = _predict(served, capsys, monkeypatch, 1)
    r = served.client.post("/classify", files={"image": ("cut.jpg", (served.folder / "cut.jpg").read_bytes())})
    assert r.status_code == 400
    assert offline["cut.jpg"]["error"] in r.json()["error"] and "truncated or corrupt" in offline["cut.jpg"]["error"]
