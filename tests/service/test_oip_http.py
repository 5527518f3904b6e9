"""The Open Inference Protocol through a real `bentoml serve`: `tritonclient[http]` and the `kserve` v2
client classify a real photo as /classify does, and bad input gets the protocol's 4xx error.

The clients run in their own venv (tests/support/clients_venv.py), in a subprocess; one server serves the
file (the fake Lite0 checkpoint, placed in the gateway's process, BatchNorm calibrated on the photos so each
gets a decisive answer)."""
import base64

import httpx
import numpy as np
import pytest

from loadtest.images import photos
from tests.support import clients_venv
from tests.support.fake_store import make_fake_checkpoint
from tests.support.serving import Server, write_config

pytestmark = pytest.mark.server

MAX_BODY_MB = 1

TRITON = """
import json, sys
import numpy as np
import tritonclient.http as http

url, model, path, pixels = sys.argv[1:5]
c = http.InferenceServerClient(url)
state = [c.is_server_live(), c.is_server_ready(), c.is_model_ready(model)]
meta = c.get_model_metadata(model)
image = http.InferInput("image", [1], "BYTES")
image.set_data_from_numpy(np.array([open(path, "rb").read()], dtype=np.object_))
asked = [http.InferRequestedOutput("scores"), http.InferRequestedOutput("top_k", class_count=3)]
encoded = c.infer(model, [image], outputs=asked)
array = np.load(pixels)
tensor = http.InferInput("pixels", list(array.shape), "UINT8")
tensor.set_data_from_numpy(array)
decoded = c.infer(model, [tensor], outputs=asked)
try:
    c.infer("no-such-model", [image])
    refusal = None
except http.InferenceServerException as e:
    refusal = [e.status(), e.message()]
text = lambda a: [x.decode() if isinstance(x, bytes) else x for x in a.ravel()]  # JSON answers: str
print(json.dumps({"state": state, "inputs": [i["name"] for i in meta["inputs"]], "refusal": refusal,
                  "top_k": text(encoded.as_numpy("top_k")),
                  "scores": encoded.as_numpy("scores").shape,
                  "pixels_top_k": text(decoded.as_numpy("top_k"))}))
"""

KSERVE = """
import asyncio, json, sys
import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

url, model, path = sys.argv[1:4]

async def main():
    c = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
    state = [await c.is_server_live(url), await c.is_server_ready(url), await c.is_model_ready(url, model)]
    image = InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([open(path, "rb").read()], dtype=np.object_), binary_data=True)
    answer = await c.infer(url, InferRequest(model, [image], parameters={"top_k": 3}), model_name=model)
    out = {o.name: o.as_numpy() for o in answer.outputs}
    await c.close()
    top = [x.decode() if isinstance(x, bytes) else x for x in out["top_k"].ravel()]
    print(json.dumps({"state": state, "top_k": top, "scores": out["scores"].shape}))

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("oip") / "bentoml"
    tag = make_fake_checkpoint(home, "lite0-fake", "lite0", "imagenet")
    cfg = write_config(home.parent / "serve.yaml", {
        "server": {"cpu_threads": 1, "max_body_mb": MAX_BODY_MB},
        "variants": {"lite0": {"model": tag, "engine": "torch", "placement": "gateway"}},
        "routes": {"imagenet": {"split": {"lite0": 1}}},
    })
    with Server(home, cfg) as s:
        s.wait("/readyz")
        s.client = httpx.Client(base_url=s.url, timeout=60)
        yield s
        s.client.close()


@pytest.fixture(scope="module")
def photo(server, tmp_path_factory):
    """A real photo, the file it is in, its decoded pixels (.npy) and what /classify answers for it."""
    import io

    from PIL import Image

    data = photos()[0].data
    folder = tmp_path_factory.mktemp("photo")
    (folder / "photo").write_bytes(data)
    np.save(folder / "pixels.npy", np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[None])
    r = server.client.post("/classify", data={"variant": "lite0", "top_k": "3"}, files={"image": ("p", data)})
    assert r.status_code == 200, r.text
    return data, folder, [p["label"] for p in r.json()["predictions"]]


def labels(top_k: list[str]) -> list[str]:
    return [s.split(":", 2)[2] for s in top_k]


def test_tritonclient_classifies_a_photo_as_classify_does(server, photo):
    _, folder, expected = photo
    out = clients_venv.run(TRITON, f"127.0.0.1:{server.port}", "imagenet", str(folder / "photo"),
                           str(folder / "pixels.npy"))
    assert out["state"] == [True, True, True] and out["inputs"] == ["image", "pixels"]
    assert labels(out["top_k"]) == expected and out["scores"] == [1, 1000]
    assert labels(out["pixels_top_k"])[0] == expected[0]  # the same photo sent decoded, as UINT8 [1, H, W, 3]
    assert out["refusal"][0] == "404"
    assert "unknown model 'no-such-model'" in out["refusal"][1]


def test_the_kserve_client_classifies_a_photo_as_classify_does(server, photo):
    _, folder, expected = photo
    out = clients_venv.run(KSERVE, server.url, "lite0", str(folder / "photo"))
    assert out["state"] == [True, True, True]
    assert labels(out["top_k"]) == expected and out["scores"] == [1, 1000]


def infer(server, tensor: dict, model: str = "lite0", **kw) -> httpx.Response:
    return server.client.post(f"/v2/models/{model}/infer", json={"inputs": [tensor]}, **kw)


def b64(data: bytes) -> dict:
    return {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(data).decode()]}


@pytest.mark.parametrize("bad", [b"not an image at all", b"\x89PNG\r\n\x1a\n truncated", b""])
def test_a_bad_image_gets_the_status_and_message_classify_gives_it(server, bad):
    ours = server.client.post("/classify", data={"variant": "lite0"}, files={"image": ("x", bad)})
    theirs = infer(server, b64(bad))
    assert 400 <= theirs.status_code < 500 and theirs.status_code == ours.status_code
    assert theirs.json()["error"] == ours.json()["error"]


@pytest.mark.parametrize("tensor, status, says", [
    ({"name": "image", "datatype": "FP32", "shape": [1], "data": [0.5]}, 400, "datatype 'FP32'"),
    ({"name": "pixels", "datatype": "UINT8", "shape": [1, 2, 2], "data": [0] * 4}, 400, "[N, H, W, 3]"),
    ({"name": "image", "datatype": "BYTES", "shape": [3], "data": ["aGk="]}, 400, "says 3 images"),
])
def test_a_wrong_datatype_or_shape_is_a_400_naming_it(server, tensor, status, says):
    r = infer(server, tensor)
    assert r.status_code == status and says in r.json()["error"], r.text


def test_unknown_models_and_versions_are_404s(server, photo):
    assert infer(server, b64(photo[0]), model="b7").status_code == 404
    assert "unknown model 'b7'" in server.client.get("/v2/models/b7").json()["error"]
    assert server.client.get("/v2/models/lite0/versions/2/ready").status_code == 404
    assert server.client.post("/v2/models/lite0/versions/1/infer", json={"inputs": [b64(photo[0])]}).status_code == 200


def test_a_body_above_the_limit_is_a_413_and_top_k_above_the_classes_a_400(server, photo):
    big = infer(server, b64(b"x" * (MAX_BODY_MB * 1024 * 1024)))
    assert big.status_code == 413 and "error" in big.json()
    r = server.client.post("/v2/models/imagenet/infer", json={"inputs": [b64(photo[0])], "parameters": {"top_k": 0}})
    assert r.status_code == 400 and "top_k" in r.json()["error"]


def test_metadata_names_the_inputs_and_the_outputs_shape(server):
    meta = server.client.get("/v2/models/imagenet").json()
    assert meta["versions"] == ["1"] and meta["parameters"]["variants"] == "lite0"
    assert {o["name"]: o["shape"] for o in meta["outputs"]}["scores"] == [-1, 1000]
    assert server.client.get("/v2").json()["name"] == "effnet-serving"


def test_answers_and_refusals_are_counted_as_the_gateways_own(server, photo):
    before = server.client.get("/metrics").text
    assert server.client.post("/v2/models/imagenet/infer", json={"inputs": [b64(photo[0])]}).status_code == 200
    after = server.client.get("/metrics").text
    ok = 'effnet_requests_total{endpoint="infer",route="imagenet",status="200",variant="lite0"}'

    def count(text: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(ok))
    assert count(after) == count(before) + 1
