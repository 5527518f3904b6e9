"""The Open Inference Protocol over REST (KServe's v2 protocol, Triton's HTTP API) beside our own API.

A model name is a variant or a route: routing, admission, decoding, dispatch, limits, metrics and the
answer's accounting are the gateway's own (`service.gateway`, `service.cascade`): this module only
reads the protocol's request into encoded images and writes the protocol's answer.

- inputs: `image`, BYTES [N] (or [N, 1]): encoded images (JPEG, PNG, ...), in the JSON `data` as
  base64 strings or as binary data after the JSON header (the binary tensor data extension that
  `tritonclient` and `kserve` send, `Inference-Header-Content-Length`); or `pixels`, UINT8
  [N, H, W, 3] (or [H, W, 3]): decoded RGB images. One of the two per request.
- outputs: `scores`, FP32 [N, classes] (softmax), and `top_k`, BYTES [N, k] of "score:index:label"
  (the format of Triton's classification extension); k from the request's `top_k` parameter or the
  `top_k` output's `classification` parameter. Answers are JSON: both clients read them whether or
  not they asked for binary outputs.
- errors: `{"error": message}` (with our `request_id`) and the gateway's status: 400 for a bad
  request, 404 for an unknown model or version, 413, 429 and 503 as on /classify.
- a variant's versions are `1` (whichever of its versions the shares pick, service/versions.py) and each
  loaded version by the part of its store tag after the colon: `/versions/V/` answers with that one only;
  a route has version `1`.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import struct
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse

from . import cascade, forms, metrics
from .budget import HEADER as BUDGET_HEADER
from .errors import ClientError, error_response, request_id
from .openapi import version
from .routing import RoutingError, shown
from .versions import PINNED, short

HEADER_LENGTH = "inference-header-content-length"  # the binary tensor data extension
VERSION = "1"
PLATFORM = "effnet"
SERVER = "effnet-serving"
IMAGE, PIXELS = "image", "pixels"  # the two inputs: encoded images, or decoded RGB pixels
SCORES, TOP_K = "scores", "top_k"  # the two outputs
INPUTS = [{"name": IMAGE, "datatype": "BYTES", "shape": [-1]},
          {"name": PIXELS, "datatype": "UINT8", "shape": [-1, -1, -1, 3]}]
_DATATYPES = {IMAGE: "BYTES", PIXELS: "UINT8"}


@dataclass(frozen=True)
class Target:
    """What a model name addresses: a route (its split decides) or one variant."""
    name: str
    route: str | None
    variant: str | None


def versions_of(gw: Any, target: Target) -> list[str]:
    """The model's versions: `1`, and a variant's loaded versions (service/versions.py)."""
    if target.variant is None or gw.versions is None:
        return [VERSION]
    return [VERSION, *(short(tag) for tag in gw.versions.get(target.variant).versions)]


def resolve(cfg: Any, name: str, version: str | None, gw: Any = None) -> Target:
    """The route or variant named `name` (a variant first: a route may share a variant's name); raises
    ClientError 404 naming the models, or the versions."""
    if name in cfg.variants:
        target = Target(name, None, name)
    elif name in cfg.routes:
        target = Target(name, name, None)
    else:
        raise ClientError(f"unknown model {shown(name)}; models (variants and routes): "
                          f"{', '.join([*cfg.variants, *(r for r in cfg.routes if r not in cfg.variants)])}", 404)
    if version is not None and version != VERSION:  # only then: not on every infer's path
        known = versions_of(gw, target) if gw is not None else [VERSION]
        if version not in known:
            raise ClientError(f"model {name!r} has no version {shown(version)}; its versions: {', '.join(known)}", 404)
    return target


# the request ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InferRequest:
    id: str | None
    images: list[bytes]  # encoded images, one per item (decoded pixels are encoded losslessly as BMP)
    top_k: str | None  # as sent; checked against the variant's classes by forms.top_k
    outputs: tuple[str, ...]  # the outputs asked for, in order


def parse(body: bytes, header_length: str | None, max_images: int, max_pixels: int) -> InferRequest:
    """An infer request's body -> its images and options; raises ClientError (400) naming the problem."""
    head, rest = body, b""
    if header_length is not None:
        if not header_length.strip().isdigit() or not 0 < int(header_length) <= len(body):
            raise ClientError(f"Inference-Header-Content-Length must be the length of the JSON header, from 1 to "
                              f"the body's {len(body)} bytes, got {shown(header_length)}")
        head, rest = body[:int(header_length)], body[int(header_length):]
    try:
        req = json.loads(head or b"null")
    except ValueError as e:
        raise ClientError(f"the inference request is not JSON: {e}") from None
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list):
        raise ClientError('an inference request is a JSON object with "inputs": a list of tensors')
    inputs = req["inputs"]
    if len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ClientError(f"send one input, {IMAGE!r} (BYTES: encoded images) or {PIXELS!r} (UINT8 [N, H, W, 3]); "
                          f"got {len(inputs)}")
    tensor, binary = inputs[0], rest
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if name not in _DATATYPES:
        raise ClientError(f"unknown input {shown(name)}; inputs: {IMAGE} (BYTES), {PIXELS} (UINT8)")
    if datatype != _DATATYPES[name]:
        raise ClientError(f"input {name!r} is {_DATATYPES[name]}, got datatype {shown(datatype)}")
    if not (isinstance(shape, list) and shape and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise ClientError(f"input {name!r}: shape must be a list of sizes, got {shown(shape)}")
    params = tensor.get("parameters") or {}
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size != len(binary):
            raise ClientError(f"input {name!r}: binary_data_size {shown(size)} is not the {len(binary)} bytes "
                              "after the JSON header")
    elif "data" not in tensor:
        raise ClientError(f"input {name!r} has neither data nor binary_data_size")
    if name == IMAGE:
        images = _encoded(shape, tensor.get("data"), binary if size is not None else None)
    else:
        images = _pixels(shape, tensor.get("data"), binary if size is not None else None, max_pixels)
    if not 1 <= len(images) <= max_images:
        raise ClientError(f"{len(images)} images: send 1 to {max_images} per request (server.max_batch_images)")
    return InferRequest(req.get("id") if isinstance(req.get("id"), str) else None, images, *_options(req))


def _encoded(shape: list[int], data: Any, binary: bytes | None) -> list[bytes]:
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise ClientError(f"input {IMAGE!r}: shape must be [N] or [N, 1] (one encoded image each), got {shape}")
    if binary is not None:
        items, at = [], 0
        while at < len(binary):  # each element: its length as a 4-byte little-endian integer, then its bytes
            if at + 4 > len(binary):
                raise ClientError(f"input {IMAGE!r}: the binary data ends inside an element's length")
            (n,), at = struct.unpack_from("<I", binary, at), at + 4
            if at + n > len(binary):
                raise ClientError(f"input {IMAGE!r}: an element of {n} bytes runs past the binary data")
            items.append(binary[at:at + n])
            at += n
    else:
        flat = np.asarray(data, dtype=object).ravel().tolist() if isinstance(data, list) else None
        if flat is None or not all(isinstance(s, str) for s in flat):
            raise ClientError(f"input {IMAGE!r}: data must be a list of base64 strings, one encoded image each")
        try:
            items = [base64.b64decode(s, validate=True) for s in flat]
        except binascii.Error as e:
            raise ClientError(f"input {IMAGE!r}: an element is not base64 ({e})") from None
    if len(items) != int(np.prod(shape)):
        raise ClientError(f"input {IMAGE!r}: shape {shape} says {int(np.prod(shape))} images, the data holds "
                          f"{len(items)}")
    return items


def _pixels(shape: list[int], data: Any, binary: bytes | None, max_pixels: int) -> list[bytes]:
    if len(shape) == 3:
        shape = [1, *shape]
    if len(shape) != 4 or shape[3] != 3 or 0 in shape:
        raise ClientError(f"input {PIXELS!r}: shape must be [N, H, W, 3] or [H, W, 3] (RGB), got {shape}")
    if shape[1] * shape[2] > max_pixels:
        raise ClientError(f"input {PIXELS!r}: {shape[2]}x{shape[1]} is above the limit of {max_pixels:,} pixels "
                          "(server.max_pixels)", 413)
    if binary is not None:
        if len(binary) != int(np.prod(shape)):
            raise ClientError(f"input {PIXELS!r}: shape {shape} takes {int(np.prod(shape)):,} bytes, the binary data "
                              f"holds {len(binary):,}")
        array = np.frombuffer(binary, np.uint8).reshape(shape)
    else:
        try:
            values = np.asarray(data, dtype=np.int64)
        except (TypeError, ValueError, OverflowError):
            raise ClientError(f"input {PIXELS!r}: data must be integers from 0 to 255") from None
        if values.size != int(np.prod(shape)) or values.dtype != np.int64:
            raise ClientError(f"input {PIXELS!r}: shape {shape} takes {int(np.prod(shape)):,} values, the data "
                              f"holds {values.size:,}")
        if values.size and (values.min() < 0 or values.max() > 255):
            raise ClientError(f"input {PIXELS!r}: UINT8 values are from 0 to 255")
        array = values.astype(np.uint8).reshape(shape)
    # Encoded losslessly, each image then takes the gateway's own path (its pixel limits, decoding budget and
    # crop) as an upload would: a BMP is a header in front of the same bytes.
    from PIL import Image

    out = []
    for image in array:
        buf = io.BytesIO()
        Image.fromarray(image, "RGB").save(buf, "BMP")
        out.append(buf.getvalue())
    return out


def _options(req: dict) -> tuple[str | None, tuple[str, ...]]:
    """top_k (the request's parameter, or the top_k output's `classification`) and the outputs asked for."""
    params = req.get("parameters") if isinstance(req.get("parameters"), dict) else {}
    k = params.get("top_k")
    asked = req.get("outputs")
    if asked is None:
        return (None if k is None else str(k)), (SCORES, TOP_K)
    if not isinstance(asked, list) or not all(isinstance(o, dict) for o in asked):
        raise ClientError('"outputs" must be a list of {"name": ...} objects')
    names = tuple(o.get("name") for o in asked)
    unknown = [n for n in names if n not in (SCORES, TOP_K)]
    if unknown:
        raise ClientError(f"unknown output(s) {shown(unknown)}; outputs: {SCORES}, {TOP_K}")
    for o in asked:
        if o["name"] == TOP_K and isinstance(o.get("parameters"), dict) and "classification" in o["parameters"]:
            k = o["parameters"]["classification"]
    return (None if k is None else str(k)), names


# the answer -----------------------------------------------------------------------------------------------

def outputs(scores: np.ndarray, top_k: int, classes: list[list[str]], asked: tuple[str, ...]) -> list[dict]:
    """The answer's output tensors for scores (N, K), each row's classes its own (a cascade's rows may come
    from different stages, which share one label space)."""
    out = []
    for name in asked:
        if name == SCORES:
            out.append({"name": SCORES, "datatype": "FP32", "shape": list(scores.shape),
                        "data": scores.astype(np.float32).ravel().tolist()})
        else:
            idx = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
            data = [f"{float(row[i]):.6f}:{int(i)}:{names[i]}" for row, top, names in zip(scores, idx, classes)
                    for i in top]
            out.append({"name": TOP_K, "datatype": "BYTES", "shape": [len(scores), top_k], "data": data})
    return out


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past `limit` (server.max_body_mb) on its Content-Length or as it arrives:
    the gateway's upload limits (service/http_limits.py) have checked it already; this holds where the
    app runs without them (tests of the handler alone)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise ClientError(f"request body of {int(length):,} bytes is above the limit of {limit:,} bytes", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ClientError(f"request body is above the limit of {limit:,} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


async def infer(gw: Any, request: Request, rid: str, t0: float, labels: list[str]) -> dict:
    """One infer request through the gateway `gw`: every image to the variant the route (or name) picks, or
    through the route's cascade, all at once so that the variant's coalescer batches them; the protocol's
    answer. `labels` (route, variant) are the metrics' labels once routed."""
    server = gw.cfg.server
    version = request.path_params.get("version")
    target = resolve(gw.cfg, request.path_params["name"], version, gw)
    if version not in (None, VERSION):
        PINNED.set(version)  # this request's task only: the dispatcher answers it with that version
    body = await read_body(request, server.max_body_bytes)
    req = parse(body, request.headers.get(HEADER_LENGTH), server.max_batch_images, server.max_pixels)
    client = request.headers.get("x-client-id")
    down = gw.health.down_variants()
    try:
        a = gw.router.assign(target.route, target.variant, client, down)
    except RoutingError as e:
        raise ClientError(str(e)) from None
    a = gw.budget.assign(gw.cfg.routes[a.route], a, request.headers.getlist(BUDGET_HEADER), len(req.images), down)
    labels[:] = [a.route, a.variant]
    if (policy := cascade.cascade_of(gw.cfg.routes[a.route], a.how)) is not None:
        a, k = cascade.assign(gw, a, policy, req.top_k)
        cut = gw.budget.cascade_cut(policy.stages, request.headers.getlist(BUDGET_HEADER), len(req.images))
        a = replace(a, budget=cut)
        done = await asyncio.gather(*(cascade.run_stages(policy, cascade.stage_call(gw, a.route, data),
                                                         cut.last if cut is not None else None)
                                      for data in req.images))
        for i, out in enumerate(done):  # counted and recorded as /classify's answers of the cascade
            cascade.answer(gw, f"{rid}-{i}", t0, a, k, out, client)
        variants, scores = [out.variant for out in done], np.stack([out.scores for out in done])
        answered = [gw.versions.tag_of(v) for v in variants]
    else:
        m = gw.manifests.get(a.variant)  # None: the calls below say why the variant cannot answer
        k = forms.top_k(req.top_k, a.variant, m.num_classes, server.max_top_k) if m is not None else None
        results = await asyncio.gather(*(cascade.stage_call(gw, a.route, data)(a.variant) for data in req.images))
        if k is None:
            k = forms.top_k(req.top_k, a.variant, gw.manifests[a.variant].num_classes, server.max_top_k)
        for i, r in enumerate(results):  # counted and recorded as /classify's answers
            item = gw._answer(f"{rid}-{i}", a, r.scores[0], k, t0, r.version)
            item.update(gw.budget.answered(a, item["latency_ms"], r.waited))
            metrics.ASSIGNMENTS.labels(a.route, a.variant, a.how).inc()
            gw.experiments.answered(f"{rid}-{i}", a.route, a.variant, a.how, r.scores[0], item["latency_ms"], client)
        variants, scores = [a.variant] * len(results), np.concatenate([r.scores for r in results])
        answered = [r.version or gw.versions.tag_of(a.variant) for r in results]
    for v in variants:  # counted per image, as /classify_batch counts them
        metrics.REQUESTS.labels("infer", a.route, v, "200").inc()
    return {"model_name": target.name, "model_version": version or VERSION, "id": req.id or rid,
            "parameters": {"request_id": rid, "route": a.route, "variants": ",".join(variants), "assignment": a.how,
                           "versions": ",".join(answered)},
            "outputs": outputs(scores, k, [gw.manifests[v].classes for v in variants], req.outputs)}


# metadata and readiness -----------------------------------------------------------------------------------

def model_metadata(gw: Any, target: Target) -> dict:
    variants = [target.variant] if target.variant else list(gw.cfg.routes[target.route].variants)
    classes = next((gw.manifests[v].num_classes for v in variants if v in gw.manifests), -1)
    return {"name": target.name, "versions": versions_of(gw, target), "platform": PLATFORM, "inputs": INPUTS,
            "outputs": [{"name": SCORES, "datatype": "FP32", "shape": [-1, classes]},
                        {"name": TOP_K, "datatype": "BYTES", "shape": [-1, -1]}],
            "parameters": {"kind": "variant" if target.variant else "route", "variants": ",".join(variants)}}


def model_ready(gw: Any, target: Target) -> tuple[bool, str | None]:
    """A variant is ready as GET /readyz/VARIANT says; a route while any variant it sends traffic to is."""
    variants = [target.variant] if target.variant else [v for v, w in gw.cfg.routes[target.route].split.items() if w > 0]
    problems = []
    for v in variants:
        state = gw.variant_readiness(v)
        if state["ready"]:
            return True, None
        problems.append(f"{v}: {state.get('problem')}")
    return False, "; ".join(problems)


# the routes (service.endpoints) ------------------------------------------------------------------------

def _gateway() -> Any:
    import bentoml

    return bentoml.get_current_service()


async def server_metadata(request: Request) -> JSONResponse:
    return JSONResponse({"name": SERVER, "version": version(), "extensions": ["binary_tensor_data"]})


async def server_live(request: Request) -> JSONResponse:
    return JSONResponse({"live": True})


async def server_ready(request: Request) -> JSONResponse:
    """Ready as GET /readyz says (server.readiness), from the last health checks."""
    gw = _gateway()
    reasons = gw.readiness.refresh()
    if reasons or not gw.readiness.published:
        return JSONResponse({"ready": False, "error": "not ready: " + ("; ".join(reasons) or "first checks running")},
                            status_code=503)
    return JSONResponse({"ready": True})


async def metadata(request: Request) -> JSONResponse:
    gw = _gateway()
    try:
        target = resolve(gw.cfg, request.path_params["name"], request.path_params.get("version"), gw)
    except ClientError as e:
        return error_response(request_id(), e.status, str(e))
    return JSONResponse(model_metadata(gw, target))


async def ready(request: Request) -> JSONResponse:
    """200 while the model answers, else 503 (as KServe answers) with why."""
    gw = _gateway()
    try:
        version = request.path_params.get("version")
        target = resolve(gw.cfg, request.path_params["name"], version, gw)
    except ClientError as e:
        return error_response(request_id(), e.status, str(e))
    ok, why = model_ready(gw, target)
    if ok and version not in (None, VERSION):  # that version itself serves, not only its variant
        row = next(v for v in gw.versions.describe(target.variant)["versions"] if short(v["tag"]) == version)
        ok = row["state"] == "ready"
        why = None if ok else f"version {row['tag']} is {row['state']}"
    return JSONResponse({"name": target.name, "ready": ok, **({"error": why} if why else {})},
                        status_code=200 if ok else 503)


async def infer_route(request: Request) -> JSONResponse:
    gw = _gateway()
    return await gw._respond("infer", lambda rid, t0, labels: infer(gw, request, rid, t0, labels))
