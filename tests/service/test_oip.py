"""The Open Inference Protocol's request and answer (service/oip.py), without a server: what each input
form reads as, and every malformed request refused with a 400 (404 for a model) that names its problem."""
import base64
import io
import json
import struct
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from service.errors import ClientError
from service.oip import IMAGE, PIXELS, SCORES, TOP_K, outputs, parse, resolve


def body(tensor: dict, **extra) -> bytes:
    return json.dumps({"inputs": [tensor], **extra}).encode()


def binary(tensor: dict, data: bytes, **extra) -> tuple[bytes, str]:
    head = body({**tensor, "parameters": {"binary_data_size": len(data)}}, **extra)
    return head + data, str(len(head))


def refused(raw: bytes, header: str | None = None, **limits) -> ClientError:
    with pytest.raises(ClientError) as e:
        parse(raw, header, limits.get("max_images", 8), limits.get("max_pixels", 10_000))
    return e.value


def test_base64_and_binary_images_read_as_the_same_bytes():
    images = [b"\x89PNG first", b"\xff\xd8 second"]
    as_json = parse(body({"name": IMAGE, "datatype": "BYTES", "shape": [2],
                          "data": [base64.b64encode(i).decode() for i in images]}), None, 8, 10_000)
    blob = b"".join(struct.pack("<I", len(i)) + i for i in images)
    as_binary = parse(*binary({"name": IMAGE, "datatype": "BYTES", "shape": [2, 1]}, blob), 8, 10_000)
    assert as_json.images == as_binary.images == images


def test_pixels_become_a_lossless_image_of_the_same_values():
    pixels = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    req = parse(*binary({"name": PIXELS, "datatype": "UINT8", "shape": [2, 5, 7, 3]}, pixels.tobytes()), 8, 10_000)
    assert [np.asarray(Image.open(io.BytesIO(b))).tolist() for b in req.images] == pixels.tolist()
    one = parse(body({"name": PIXELS, "datatype": "UINT8", "shape": [5, 7, 3], "data": pixels[0].tolist()}), None, 8,
                10_000)
    assert np.asarray(Image.open(io.BytesIO(one.images[0]))).tolist() == pixels[0].tolist()


def test_top_k_comes_from_the_parameter_or_the_outputs_classification():
    tensor = {"name": IMAGE, "datatype": "BYTES", "shape": [1], "data": ["aGk="]}
    assert parse(body(tensor, parameters={"top_k": 3}), None, 8, 10_000).top_k == "3"
    req = parse(body(tensor, outputs=[{"name": TOP_K, "parameters": {"classification": 2}}]), None, 8, 10_000)
    assert (req.top_k, req.outputs) == ("2", (TOP_K,))
    assert parse(body(tensor), None, 8, 10_000).outputs == (SCORES, TOP_K)


@pytest.mark.parametrize("raw, says", [
    (b"not json", "not JSON"),
    (b'{"inputs": 3}', '"inputs"'),
    (body({"name": "photo", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}), "unknown input 'photo'"),
    (body({"name": IMAGE, "datatype": "FP32", "shape": [1], "data": [1.0]}), "is BYTES, got datatype 'FP32'"),
    (body({"name": PIXELS, "datatype": "BYTES", "shape": [1], "data": ["aGk="]}), "is UINT8"),
    (body({"name": IMAGE, "datatype": "BYTES", "shape": [2], "data": ["aGk="]}), "shape [2] says 2 images"),
    (body({"name": IMAGE, "datatype": "BYTES", "shape": [1, 2], "data": ["aGk=", "aGk="]}), "[N] or [N, 1]"),
    (body({"name": IMAGE, "datatype": "BYTES", "shape": [1], "data": ["not base64!"]}), "not base64"),
    (body({"name": IMAGE, "datatype": "BYTES", "shape": [1], "data": [7]}), "base64 strings"),
    (body({"name": IMAGE, "datatype": "BYTES", "shape": [1]}), "neither data nor binary_data_size"),
    (body({"name": PIXELS, "datatype": "UINT8", "shape": [1, 2, 2, 4], "data": [0] * 16}), "[N, H, W, 3]"),
    (body({"name": PIXELS, "datatype": "UINT8", "shape": [1, 2, 2, 3], "data": [0] * 11}), "takes 12 values"),
    (body({"name": PIXELS, "datatype": "UINT8", "shape": [1, 1, 1, 3], "data": [0, 256, 0]}), "from 0 to 255"),
    (body({"name": IMAGE, "datatype": "BYTES", "shape": [0], "data": []}), "send 1 to 8"),
    (body({"name": IMAGE, "datatype": "BYTES", "shape": [1], "data": ["aGk="]}, outputs=[{"name": "probs"}]),
     "unknown output(s) ['probs']"),
])
def test_a_malformed_request_is_a_400_naming_its_problem(raw, says):
    e = refused(raw)
    assert e.status == 400 and says in str(e), str(e)


def test_binary_data_that_disagrees_with_its_header_is_refused():
    raw, n = binary({"name": IMAGE, "datatype": "BYTES", "shape": [1]}, struct.pack("<I", 10) + b"short")
    assert "runs past the binary data" in str(refused(raw, n))
    assert "Inference-Header-Content-Length" in str(refused(raw, str(len(raw) + 1)))
    head = body({"name": IMAGE, "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 99}})
    assert "binary_data_size 99" in str(refused(head + b"x" * 5, str(len(head))))


def test_pixels_above_the_pixel_limit_are_a_413():
    e = refused(body({"name": PIXELS, "datatype": "UINT8", "shape": [1, 200, 200, 3], "data": [0]}), max_pixels=10_000)
    assert e.status == 413 and "server.max_pixels" in str(e)


def test_a_model_is_a_variant_or_a_route_with_the_one_version():
    cfg = SimpleNamespace(variants={"lite0": 0, "compact": 0}, routes={"imagenet": 0})
    assert (resolve(cfg, "lite0", None).variant, resolve(cfg, "imagenet", "1").route) == ("lite0", "imagenet")
    with pytest.raises(ClientError) as e:
        resolve(cfg, "b7", None)
    assert e.value.status == 404 and "lite0, compact, imagenet" in str(e.value)
    with pytest.raises(ClientError) as e:
        resolve(cfg, "lite0", "2")
    assert e.value.status == 404 and "versions: 1" in str(e.value)


def test_top_k_output_lists_each_rows_best_classes_as_score_index_label():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]], np.float32)
    out = {o["name"]: o for o in outputs(scores, 2, [["a", "b", "c"]] * 2, (SCORES, TOP_K))}
    assert out[SCORES]["shape"] == [2, 3] and np.allclose(out[SCORES]["data"], scores.ravel())
    assert out[TOP_K]["shape"] == [2, 2]
    assert [s.split(":", 1)[1] for s in out[TOP_K]["data"]] == ["1:b", "2:c", "0:a", "2:c"]


def test_the_gateways_upload_limits_guard_the_infer_paths_with_a_bounded_endpoint_label():
    from service.http_limits import limited_endpoint

    assert limited_endpoint("POST", "/classify") == "classify"
    assert limited_endpoint("POST", "/classify_batch") == "classify_batch"
    assert limited_endpoint("POST", "/v2/models/b0/infer") == "infer"
    assert limited_endpoint("POST", "/v2/models/fashion/versions/1/infer") == "infer"
    for method, path in (("GET", "/v2/models/b0/infer"), ("POST", "/v2/models/b0"), ("POST", "/v2/models/a/b/infer"),
                         ("POST", "/feedback"), ("GET", "/classify")):
        assert limited_endpoint(method, path) is None, (method, path)
