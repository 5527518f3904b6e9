"""Serving without a server: router, configuration, image decoding, request limits."""
import asyncio
import base64
import io
import json
import os
import random
import types
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from service.config import ConfigError, check_label_spaces, load_config, parse_config
from service.gateway import LimitsMiddleware
from service.images import DecodeBudget, ImageError, decode_image
from service.routing import Router, RoutingError, pick_by_weight, sticky_pick

CFG = {
    "default_route": "fashion",
    "variants": {"b0": {"model": "b0:latest"}, "mec": {"model": "mec:latest"}, "compact": {"model": "c:latest"},
                 "lite0": {"model": "l:latest"}},
    "routes": {"fashion": {"split": {"b0": 0.5, "mec": 0.25, "compact": 0.25}, "shadow": {"variant": "mec", "fraction": 1.0}},
               "imagenet": {"split": {"lite0": 1}}},
}


def router(seed=0):
    return Router(parse_config(CFG), rng=random.Random(seed))


# router ----------------------------------------------------------------------------------------------

def test_same_client_id_always_gets_the_same_variant():
    r = router()
    assert len({r.assign(client_id="client-42").variant for _ in range(20)}) == 1
    # and in a fresh router (another process): the hash is stable, not Python's salted hash()
    assert router(seed=9).assign(client_id="client-42").variant == r.assign(client_id="client-42").variant


def test_two_thousand_client_ids_split_within_4_points_of_the_weights():
    r = router()
    counts = Counter(r.assign(client_id=f"user-{i}").variant for i in range(2000))
    for variant, weight in {"b0": 0.5, "mec": 0.25, "compact": 0.25}.items():
        assert abs(counts[variant] / 2000 - weight) < 0.04, counts


def test_without_client_id_the_split_is_random_by_weight():
    r = router()
    counts = Counter(r.assign().variant for _ in range(4000))
    assert abs(counts["b0"] / 4000 - 0.5) < 0.04 and set(counts) == {"b0", "mec", "compact"}
    assert r.assign().how == "split" and r.assign().route == "fashion"


def test_explicit_variant_wins_and_finds_its_route():
    r = router()
    a = r.assign(variant="lite0", client_id="x")
    assert (a.route, a.variant, a.how, a.shadow) == ("imagenet", "lite0", "explicit", None)
    assert r.assign(route="imagenet").how == "default"  # one variant: nothing was chosen


@pytest.mark.parametrize("kwargs, message", [
    ({"variant": "nope"}, "unknown variant 'nope'; variants: b0, mec, compact, lite0"),
    ({"route": "nope"}, "unknown route 'nope'; routes: fashion, imagenet"),
    ({"route": "imagenet", "variant": "b0"}, "variant 'b0' is not in route 'imagenet'; its variants: lite0"),
    ({"variant": "x" * 10_000}, r"unknown variant 'x{63}\.\.\. .10,000 characters.; variants: b0, mec"),
])
def test_routing_errors_list_the_valid_names(kwargs, message):
    with pytest.raises(RoutingError, match=message.replace("(", r"\(")):
        router().assign(**kwargs)


def test_shadow_mirrors_only_other_primaries():
    r = router()
    for i in range(50):
        a = r.assign(client_id=str(i))
        assert a.shadow == (None if a.variant == "mec" else "mec")


def test_pick_by_weight_covers_the_unit_interval():
    split = {"a": 0.2, "b": 0.8}
    assert pick_by_weight(split, 0.0) == "a" and pick_by_weight(split, 0.19) == "a"
    assert pick_by_weight(split, 0.2) == "b" and pick_by_weight(split, 0.999999) == "b"


@pytest.mark.parametrize("before, after", [
    ({"b0": 0.5, "mec": 0.25, "compact": 0.25}, {"b0": 0.6, "mec": 0.2, "compact": 0.2}),
    ({"b0": 0.95, "compact": 0.05}, {"b0": 0.75, "compact": 0.25}),  # a canary step
])
def test_a_weight_change_moves_only_the_clients_that_must_move(before, after):
    ids = [f"user-{i}" for i in range(5000)]
    a = {c: sticky_pick("fashion", c, before) for c in ids}
    b = {c: sticky_pick("fashion", c, after) for c in ids}
    moved = [(a[c], b[c]) for c in ids if a[c] != b[c]]
    gained = {v for v in after if after[v] > before.get(v, 0)}
    assert all(old not in gained and new in gained for old, new in moved), Counter(moved)
    need = sum(max(0.0, after[v] - before.get(v, 0)) for v in after)
    assert abs(len(moved) / len(ids) - need) < 0.02
    for v, w in after.items():
        assert abs(sum(x == v for x in b.values()) / len(ids) - w) < 0.02


# configuration --------------------------------------------------------------------------------------

def test_default_config_serves_the_default_store():
    cfg = load_config()
    assert cfg.default_route == "fashion"
    assert set(cfg.routes["fashion"].split) == {"b0", "mec", "compact"} and cfg.routes["fashion"].shadow
    assert cfg.variants["lite0"].model == "lite0-imagenet:latest"
    assert cfg.server.max_body_bytes == 10 * 1024 * 1024
    # lite0 (224x224, inference-bound) runs two processes that share the cores; the rest one each. Every
    # variant in a worker process of its own: `placement: gateway` is a deployment's choice, not ours.
    assert cfg.variants["lite0"].workers == 2 and cfg.variants["b0"].workers == 1
    assert {v.placement for v in cfg.variants.values()} == {"worker"}


@pytest.mark.parametrize("patch, message", [
    ({"routes": {"fashion": {"split": {"b1": 1}}}}, "unknown variant 'b1'"),
    ({"default_route": "nope"}, "default_route: unknown route 'nope'"),
    ({"variants": {"b0": {"model": "x", "max_batch_size": 0}}}, "variants.b0.max_batch_size"),
    ({"variants": {"b0": {"model": "x", "typo": 1}}}, "unknown key"),
    ({"routes": {"fashion": {"split": {"b0": 1}, "shadow": {"variant": "mec", "fraction": 2}}}}, "fraction"),
    ({"server": {"max_body_mb": -1}}, "server.max_body_mb"),
    ({"routes": {"fashion": {"split": {"b0": 0, "mec": 0}}}}, "sum to 0"),
    ({"routes": {"fashion": {"split": {"b0": 1e308, "mec": 1e308}}}}, "too large to add up"),
    ({"variants": {"b0": {"model": "x", "workers": 0}}}, "variants.b0.workers: expected an integer > 0"),
    ({"server": {"tracing": "yes"}}, "server.tracing: expected true or false"),
    ({"server": {"worker_transport": "tcp"}}, "server.worker_transport: expected shared_memory or http"),
    ({"routes": {"imagenet": {"split": {"lite0": 1}, "shadow": {"variant": "lite0", "fraction": 0.5}}}},
     "routes.imagenet.shadow.variant: 'lite0' already answers every request"),
])
def test_invalid_configs_name_the_key(patch, message):
    data = {**CFG, **patch}
    if "variants" in patch:
        data["variants"] = {**CFG["variants"], **patch["variants"]}
    if "routes" in patch:
        data["routes"] = {**CFG["routes"], **patch["routes"]}
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


def test_tracing_is_skipped_for_every_url_unless_switched_on():
    from opentelemetry.util.http import ExcludeList

    from service.config import tracing_options

    off = tracing_options(parse_config(CFG).server)
    assert all(ExcludeList(off["excluded_urls"]).url_disabled(f"http://127.0.0.1:3000{path}")
               for path in ("/classify", "/classify_batch", "/predict", "/status", "/"))
    assert tracing_options(parse_config({**CFG, "server": {"tracing": True}}).server) == {}


def test_a_config_path_that_is_no_yaml_file_is_a_config_error(tmp_path):
    (tmp_path / "binary.yaml").write_bytes(bytes(range(128, 256)))
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    for path, message in [(tmp_path, "is a folder"), (tmp_path / "none.yaml", "does not exist"),
                          (tmp_path / "binary.yaml", "cannot be read as text"), (tmp_path / "list.yaml", "expected a mapping")]:
        with pytest.raises(ConfigError, match=message):  # a traceback before (IsADirectoryError, UnicodeDecodeError)
            load_config(path)


def test_more_worker_processes_than_cpu_threads_are_lowered(caplog):
    """Each CPU batch holds a core slot, so processes beyond the thread budget could only wait."""
    data = {**CFG, "server": {"cpu_threads": 2}, "variants": {**CFG["variants"], "b0": {"model": "x", "workers": 3}}}
    with caplog.at_level("WARNING"):
        cfg = parse_config(data)
    assert cfg.variants["b0"].workers == 2 and "variants.b0.workers: 3 processes on 2 CPU threads" in caplog.text


def test_a_variant_with_other_classes_than_its_route_is_named():
    cfg = parse_config(CFG)
    classes = {"b0": list("abc"), "mec": list("abc"), "compact": list("abd"), "lite0": list("xyz")}
    with pytest.raises(ConfigError, match=r"route 'fashion': variant 'compact' \(c:latest\) has 3 classes"):
        check_label_spaces(cfg, classes)
    check_label_spaces(cfg, {**classes, "compact": list("abc")})


# images ---------------------------------------------------------------------------------------------

def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


RGB = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))


@pytest.mark.parametrize("mode, fmt", [
    ("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG"), ("RGBA", "PNG"), ("LA", "PNG"),
    ("P", "PNG"), ("1", "BMP"), ("I;16", "PNG"), ("RGB", "WEBP"), ("RGBA", "WEBP"),
    ("RGB", "BMP"), ("P", "GIF"),
])
def test_every_mode_becomes_uint8_rgb(mode, fmt):
    img = RGB.convert(mode) if not mode.startswith("I") else Image.fromarray(
        (np.arange(600).reshape(20, 30) * 100).astype(np.uint16 if mode == "I;16" else np.int32))
    out = decode_image(encode(img, fmt), max_pixels=10**6)
    assert out.dtype == np.uint8 and out.shape == (3, 20, 30) and out.flags["C_CONTIGUOUS"]


def test_sixteen_bit_is_scaled_not_clipped():
    img = Image.fromarray(np.full((4, 4), 32768, np.uint16))
    assert 120 <= decode_image(encode(img, "PNG"), max_pixels=100).mean() <= 135


def test_transparency_is_composited_over_white():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert decode_image(encode(img, "PNG"), max_pixels=100).min() == 255


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = decode_image(encode(RGB, "JPEG", exif=exif), max_pixels=10**6)
    assert out.shape == (3, 30, 20)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("side", [None, 64])
def test_every_exif_orientation_gives_the_pixels_pil_does(orientation, side):
    """simplejpeg's array, turned upright and resized as PIL's own decoding is (store.images)."""
    import service.images as images

    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.effect_mandelbrot((900, 600), (-2, -1, 1, 1), 60).convert("RGB"), "JPEG", exif=exif)
    by_pil = images.to_rgb_array(images.open_image(data, max_pixels=10**7), min_side=side)  # no bytes: PIL
    out = decode_image(data, max_pixels=10**7, min_side=side)
    assert np.array_equal(out, by_pil)
    assert (out.shape[1] > out.shape[2]) == (orientation >= 5)  # 5-8 swap width and height


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    out = decode_image(buf.getvalue(), max_pixels=100)
    assert out[0].mean() > 200 and out[2].mean() < 50


def test_jpeg_draft_decodes_large_photos_smaller_but_above_min_side():
    big = RGB.resize((800, 600))
    out = decode_image(encode(big, "JPEG"), max_pixels=10**7, min_side=64)
    assert min(out.shape[1:]) >= 64 and out.shape[1] < 600


@pytest.mark.parametrize("fmt, mode", [("PNG", "RGB"), ("PNG", "L"), ("JPEG", "RGB"), ("WEBP", "RGB")])
def test_large_images_are_resized_while_decoding_as_the_service_would_resize_them(fmt, mode):
    import torch

    from store import Manifest, resize_crop

    yy, xx = np.meshgrid(np.arange(1800), np.arange(2400), indexing="ij")
    arr = (128 + 90 * np.sin(xx / 40.0) * np.cos(yy / 55.0)).astype(np.uint8)
    img = Image.fromarray(np.stack([arr, arr[::-1], 255 - arr], -1)).convert(mode)
    data = encode(img, fmt, **({"lossless": True} if fmt == "WEBP" else {"quality": 95} if fmt == "JPEG" else {}))
    small = decode_image(data, max_pixels=10**7, min_side=64)
    assert small.shape == (3, 64, 85)  # what torchvision's resize gives: int(64 * 2400 / 1800)
    m = Manifest(variant="", config={}, num_classes=2, classes=["a", "b"], dataset="", resolution=56, resize=64)
    whole = resize_crop(torch.from_numpy(decode_image(data, max_pixels=10**7)), m)
    assert (resize_crop(torch.from_numpy(small), m).int() - whole.int()).abs().max() <= 1


def test_exif_orientation_is_applied_to_resized_images_too():
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_image(encode(RGB.resize((600, 300)), "PNG", exif=exif), max_pixels=10**6, min_side=32)
    assert out.shape == (3, 64, 32)  # upright (portrait) and resized


def test_jpegs_go_to_simplejpeg_with_the_same_pixels_as_pil(monkeypatch):
    import service.images as images
    from service.bench import photos

    big = encode(RGB.resize((900, 600)), "JPEG")
    for data, side in [(d, 256) for d in photos(224)[:3]] + [(big, 256), (big, 64), (big, None)]:
        by_pil = images.to_rgb_array(images.open_image(data, max_pixels=10**6), min_side=side)  # no bytes: PIL
        assert np.array_equal(decode_image(data, max_pixels=10**6, min_side=side), by_pil)
    import store.images  # where the decoder lives (service.images re-exports it)

    calls = []
    real = store.images._decode_jpeg
    monkeypatch.setattr(store.images, "_decode_jpeg", lambda d, side, **kw: calls.append(len(d)) or real(d, side, **kw))
    decode_image(photos(224)[0], max_pixels=10**6, min_side=256)  # RGB: simplejpeg
    decode_image(encode(RGB.convert("L"), "JPEG"), max_pixels=10**6)  # gray: simplejpeg
    decode_image(encode(RGB.convert("CMYK"), "JPEG"), max_pixels=10**6)  # CMYK: checked, then PIL decodes
    decode_image(encode(RGB, "PNG"), max_pixels=10**6)
    assert len(calls) == 3


def cut_jpeg(fraction: float, end_marker: bool) -> bytes:
    """A photo cut after `fraction` of its bytes, with or without an end-of-image marker appended."""
    from service.bench import photos

    data = photos(224)[1]
    return data[:int(len(data) * fraction)] + (b"\xff\xd9" if end_marker else b"")


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9, 0.99])
@pytest.mark.parametrize("end_marker", [False, True])
@pytest.mark.parametrize("side", [None, 64])
def test_a_jpeg_cut_short_is_refused_even_when_it_ends_with_an_end_marker(fraction, end_marker, side):
    """libjpeg fills what is missing with grey and only warns: PIL and torchvision.io decoded these to a
    half-grey photo, answered 200 (store.images._decode_jpeg)."""
    with pytest.raises(ImageError, match="the JPEG image is truncated or corrupt") as e:
        decode_image(cut_jpeg(fraction, end_marker), max_pixels=10**6, min_side=side)
    assert e.value.status == 400


def test_a_cmyk_jpeg_cut_short_is_refused_and_a_whole_one_decodes_as_pil_does():
    import service.images as images

    whole = encode(RGB.resize((300, 200)).convert("CMYK"), "JPEG")
    by_pil = images.to_rgb_array(images.open_image(whole, max_pixels=10**6))  # no bytes: PIL alone
    assert np.array_equal(decode_image(whole, max_pixels=10**6), by_pil)
    with pytest.raises(ImageError, match="the JPEG image is truncated or corrupt"):
        decode_image(whole[:len(whole) // 2] + b"\xff\xd9", max_pixels=10**6)


def test_a_jpeg_with_padding_before_a_marker_still_decodes():
    """Bytes where libjpeg expects a marker ("extraneous bytes before marker"), as some cameras and
    editors write: libjpeg skips them and the photo is whole, so it is served (decoded by PIL)."""
    from service.bench import photos

    data = photos(224)[1]
    at = data.index(b"\xff\xda")  # start of scan
    padded = data[:at] + b"\x00\x00\x00" + data[at:]
    assert np.array_equal(decode_image(padded, max_pixels=10**6), decode_image(data, max_pixels=10**6))


def huge_png(w=12000, h=12000) -> bytes:
    """A small file whose header declares w x h pixels (the data is a valid IDAT-less stub)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("data, status, message", [
    (b"", 400, "empty"),
    (b"hello world, not an image" * 4, 400, "not a supported image"),
    (encode(RGB, "JPEG")[:200], 400, "truncated or corrupt"),
    (encode(RGB, "PNG")[:100], 400, "truncated or corrupt"),
    (encode(RGB, "TIFF"), 400, "TIFF is not a supported image format"),  # a real image, not on the allowlist
    (b"%PDF-1.4\n", 400, "PDF is not a supported image format"),
    (b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(40), 400, "HEIC is not a supported image format"),  # iPhone
    (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', 400, "SVG is not a supported"),
    (base64.b64encode(encode(RGB, "JPEG")), 400, "base64 text, not image bytes"),
    (b"data:image/png;base64," + base64.b64encode(encode(RGB, "PNG")), 400, "data: URL, not image bytes"),
    (encode(RGB, "PNG")[:33], 400, "the PNG image is truncated or corrupt"),  # PIL: "cannot identify"
    (encode(RGB, "BMP")[:20], 400, "the BMP image is truncated or corrupt"),
    (encode(RGB, "GIF")[:10], 400, "the GIF image is truncated or corrupt"),
    (b"BMW and other car brands, as a text file" * 3, 400, "not a supported image: the bytes are not"),
    (huge_png(), 413, "12000x12000"),
    # above twice PIL's own limit, refused while opening: our limit in the message, not PIL's
    (huge_png(20000, 20000), 413, r"declares 400,000,000 pixels, above the limit of 40,000,000\Z"),
    (huge_png(7000, 7000), 413, "7000x7000 = 49,000,000 pixels, above the limit of 40,000,000"),
])
def test_bad_images_raise_a_client_error(data, status, message):
    with pytest.raises(ImageError, match=message) as e:
        decode_image(data, max_pixels=40_000_000)
    assert e.value.status == status


# request limits (pure ASGI, with a stand-in app: the real server is in test_service_http.py) ----------

def run_asgi(mw, path="/classify", body=b"x", headers=None, chunks=1):
    sent = []

    async def receive():
        nonlocal chunks
        chunks -= 1
        return {"type": "http.request", "body": body, "more_body": chunks > 0}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": path, "method": "POST", "headers": headers or []}
    asyncio.run(mw(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], dict(start["headers"])


async def reading_app(scope, receive, send):
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def test_body_limit_refuses_by_content_length_and_while_streaming():
    mw = LimitsMiddleware(reading_app, max_body_bytes=100, max_inflight=4, retry_after_s=1)
    assert run_asgi(mw, headers=[(b"content-length", b"101")])[0] == 413
    assert run_asgi(mw, body=b"x" * 60, chunks=2)[0] == 413  # chunked: no Content-Length
    assert run_asgi(mw, body=b"x" * 50, chunks=2)[0] == 200


def test_too_many_in_flight_requests_get_429_with_retry_after():
    mw = LimitsMiddleware(reading_app, max_body_bytes=100, max_inflight=2, retry_after_s=3)
    mw.inflight = 2
    status, headers = run_asgi(mw)
    assert status == 429 and headers[b"retry-after"] == b"3"
    assert run_asgi(mw, path="/variants")[0] == 200  # other paths are not limited


def test_a_slow_upload_gets_408_and_holds_no_in_flight_slot():
    """Two requests, one slot: the slow upload waits for its body outside the slot, so the quick one
    is served meanwhile; the slow one is then answered 408 at its deadline."""
    mw = LimitsMiddleware(reading_app, max_body_bytes=100, max_inflight=1, retry_after_s=1, body_timeout_s=0.3)
    statuses = {}

    async def request(name, receive):
        sent = []

        async def send(message):
            sent.append(message)

        await mw({"type": "http", "path": "/classify", "method": "POST", "headers": []}, receive, send)
        statuses[name] = next(m["status"] for m in sent if m["type"] == "http.response.start")

    async def stalled():
        await asyncio.sleep(3600)

    async def quick():
        return {"type": "http.request", "body": b"x", "more_body": False}

    async def run():
        slow = asyncio.create_task(request("slow", stalled))
        await asyncio.sleep(0.05)
        assert mw.uploading == 1 and mw.inflight == 0
        await request("quick", quick)
        assert "slow" not in statuses
        await slow

    asyncio.run(run())
    assert statuses == {"quick": 200, "slow": 408} and mw.uploading == mw.inflight == 0


def test_too_many_uploads_get_429_and_a_client_that_leaves_gets_nothing():
    mw = LimitsMiddleware(reading_app, max_body_bytes=100, max_inflight=4, retry_after_s=2, max_uploads=1)
    mw.uploading = 1
    status, headers = run_asgi(mw)
    assert status == 429 and headers[b"retry-after"] == b"2"
    mw.uploading = 0
    sent = []

    async def gone():
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(mw({"type": "http", "path": "/classify", "method": "POST", "headers": []}, gone, send))
    assert sent == [] and mw.uploading == mw.inflight == 0


class Connection:
    """An ASGI connection as uvicorn gives it: the body, then receive() waits until the client leaves
    (or, after the answer is complete, reports a disconnect at once)."""

    def __init__(self, body=b"x"):
        self.body, self.left, self.sent = [body], asyncio.Event(), []

    async def receive(self):
        if self.body:
            return {"type": "http.request", "body": self.body.pop(), "more_body": False}
        if not any(m["type"] == "http.response.body" for m in self.sent):
            await self.left.wait()
        return {"type": "http.disconnect"}

    async def send(self, message):
        self.sent.append(message)


def test_a_request_whose_client_leaves_is_cancelled_and_frees_its_slot():
    """The work of a client that hung up must not run on: what it queued is never sent to a worker."""
    state = {}

    async def slow_app(scope, receive, send):
        await receive()
        state["started"] = True
        try:
            await asyncio.sleep(30)  # waiting for its turn at a worker
        except asyncio.CancelledError:
            state["cancelled"] = True
            raise
        await send({"type": "http.response.start", "status": 200, "headers": []})

    mw = LimitsMiddleware(slow_app, max_body_bytes=100, max_inflight=4, retry_after_s=1)
    conn = Connection()

    async def run():
        task = asyncio.create_task(mw({"type": "http", "path": "/classify", "method": "POST", "headers": []},
                                      conn.receive, conn.send))
        await asyncio.sleep(0.05)
        assert state == {"started": True} and mw.inflight == 1
        conn.left.set()
        await asyncio.wait_for(task, 2)  # returns, without raising, soon after the client left

    asyncio.run(run())
    assert state == {"started": True, "cancelled": True} and mw.inflight == 0 and conn.sent == []


def test_a_request_that_was_answered_is_not_cancelled_by_the_disconnect_after_it():
    finished = []

    async def app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        await asyncio.sleep(0.05)  # work after the answer (metrics...): must not be cancelled
        finished.append(True)

    mw = LimitsMiddleware(app, max_body_bytes=100, max_inflight=4, retry_after_s=1)
    conn = Connection()
    asyncio.run(mw({"type": "http", "path": "/classify", "method": "POST", "headers": []}, conn.receive, conn.send))
    assert finished == [True] and conn.sent[0]["status"] == 200 and mw.inflight == 0


def test_the_body_deadline_must_come_before_bentomls_timeout():
    with pytest.raises(ConfigError, match="body_timeout_s .60. must be below server.timeout_s .60."):
        parse_config({**CFG, "server": {"body_timeout_s": 60}})


# gateway -> worker calls (a stand-in worker: bentoml 1.4.30, which we pin, does not drop calls) ------

def dropped(kind="aiohttp"):
    """What a dropped gateway -> worker connection raises. bentoml 1.4.30's client between services is
    aiohttp: the H200 session's log showed ClientOSError("Can not write request body ...") when a stalled
    worker had closed pooled connections. The httpx one is what its httpx-based client raises."""
    import aiohttp
    import httpx

    return {
        "aiohttp": aiohttp.ClientOSError(None, "Can not write request body for http://127.0.0.1:3000/predict"),
        "aiohttp-disconnected": aiohttp.ServerDisconnectedError(),
        "aiohttp-reset": aiohttp.ClientConnectionResetError("Cannot write to closing transport"),
        "httpx": httpx.RemoteProtocolError("Server disconnected without sending a response."),
    }[kind]


class FlakyWorker:
    """Drops the first `drops` calls (as bentoml 1.4.31-1.4.40 do under load, FACTS.md, or as a stalled
    worker's closed keep-alive connections do), or always raises `error`."""

    def __init__(self, drops, error=None, drop="aiohttp"):
        self.drops, self.calls, self.error, self.drop = drops, 0, error, drop
        self.to_async = self

    async def predict(self, batch):
        self.calls += 1
        if self.error is not None:
            raise self.error
        if self.calls <= self.drops:
            raise dropped(self.drop)
        out = np.zeros((len(batch), 4), np.float32)
        out[:, 1], out[:, -1] = 1.0, 0.001  # scores, then the batch's seconds
        return out

    async def predict_shared(self, refs):
        """As the worker's: the batch that the references name in the gateway's shared memory."""
        from service.shm import ArenaReader

        images, verify = ArenaReader("b0").gather(refs)
        self.shared = getattr(self, "shared", 0) + 1
        out = await self.predict(images)
        verify()
        return out


def gateway_with(*workers):
    """A gateway whose variant b0 has these worker processes (replicas)."""
    from service.gateway import GatewayLogic

    gw = object.__new__(GatewayLogic)  # no server: only the call path is under test
    gw.cfg, gw.worker_attrs = parse_config(CFG), {"b0": [f"w_b0_{i}" for i in range(len(workers))]}
    for i, w in enumerate(workers):
        setattr(gw, f"w_b0_{i}", w)
    gw.replica_calls = {"b0": [0] * len(workers)}
    gw.coalescers, gw.local, gw.arenas = {}, {}, {}
    gw.decoding = DecodeBudget(gw.cfg.server.max_decoding_pixels)
    return gw


def test_batches_reach_workers_through_shared_memory_unless_told_otherwise():
    worker = FlakyWorker(drops=0)
    gw = gateway_with(worker)
    scores, _ = asyncio.run(gw.infer("b0", np.zeros((2, 3, 8, 8), np.uint8)))
    assert scores.shape == (2, 3) and worker.shared == 1 and gw.worker_transport("b0") == "shared_memory"
    assert len(gw.arenas["b0"].free) == gw.arenas["b0"].slots  # every slot given back
    http = gateway_with(worker)
    http.cfg = replace(http.cfg, server=replace(http.cfg.server, worker_transport="http"))
    asyncio.run(http.infer("b0", np.zeros((2, 3, 8, 8), np.uint8)))
    assert worker.shared == 1 and worker.calls == 2 and http.worker_transport("b0") == "http"


def test_a_worker_that_cannot_map_shared_memory_gets_the_pixels_instead():
    """On another host (or container) the worker answers 404 for the arena: the gateway sends that call
    again in the body, and every later one, and says so in /variants."""
    from bentoml.exceptions import NotFound


    class Remote(FlakyWorker):
        async def predict_shared(self, refs):
            raise NotFound("shared-memory batch ... is not on this host")

    worker = Remote(drops=0)
    gw = gateway_with(worker)
    for _ in range(2):
        scores, _ = asyncio.run(gw.infer("b0", np.zeros((1, 3, 8, 8), np.uint8)))
        assert scores[0, 1] == 1.0
    assert worker.calls == 2 and gw.arenas["b0"] is None and gw.worker_transport("b0") == "http"


def test_no_shared_memory_means_batches_in_the_body(monkeypatch):
    monkeypatch.delattr(os, "memfd_create")  # a system without it
    worker = FlakyWorker(drops=0)
    gw = gateway_with(worker)
    scores, _ = asyncio.run(gw.infer("b0", np.zeros((1, 3, 8, 8), np.uint8)))
    assert scores[0, 1] == 1.0 and worker.calls == 1 and gw.worker_transport("b0") == "http"


@pytest.mark.parametrize("drop", ["aiohttp", "aiohttp-disconnected", "aiohttp-reset", "httpx"])
def test_a_dropped_worker_connection_is_retried(drop):
    worker = FlakyWorker(drops=2, drop=drop)
    scores, wait = asyncio.run(gateway_with(worker).infer("b0", np.zeros((2, 3, 8, 8), np.uint8)))
    assert worker.calls == 3 and scores.shape == (2, 3) and scores[0, 1] == 1.0 and wait >= 0


class TimedWorker(FlakyWorker):
    """Answers after `seconds`, and remembers the most calls it had at once."""

    def __init__(self, seconds):
        super().__init__(0)
        self.seconds, self.now, self.most = seconds, 0, 0

    async def predict(self, batch):
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            await asyncio.sleep(self.seconds)
            return await super().predict(batch)
        finally:
            self.now -= 1


def test_calls_are_spread_over_a_variants_worker_processes():
    """Each worker process is its own service (service.workers.worker_names): the gateway, not the
    kernel's choice of which process accepts a pooled connection, decides where a call goes."""
    a, b = TimedWorker(0.05), TimedWorker(0.05)
    gw = gateway_with(a, b)
    gw.cfg.variants["b0"] = replace(gw.cfg.variants["b0"], calls_in_flight=4)

    async def burst():
        return await asyncio.gather(*(gw.infer("b0", np.zeros((1, 3, 8, 8), np.uint8)) for _ in range(12)))

    assert len(asyncio.run(burst())) == 12
    assert a.most == b.most == 2 and a.calls + b.calls >= 4  # never 3 on one while the other had 1
    assert gw.replica_calls["b0"] == [0, 0]  # every call given back
    lone = TimedWorker(0.0), TimedWorker(0.0)
    gw = gateway_with(*lone)
    for _ in range(3):
        asyncio.run(gw.infer("b0", np.zeros((1, 3, 8, 8), np.uint8)))
    assert [w.calls for w in lone] == [3, 0]  # one request at a time meets the same, warm, process


def test_a_dropped_connection_is_retried_on_another_worker_process():
    """A replica that is gone (killed, restarting) is not asked again for the same call while another
    can answer: the retry goes to the next one."""
    dead, alive = FlakyWorker(drops=99), FlakyWorker(drops=0)
    scores, _ = asyncio.run(gateway_with(dead, alive).infer("b0", np.zeros((1, 3, 8, 8), np.uint8)))
    assert (dead.calls, alive.calls) == (1, 1) and scores[0, 1] == 1.0


def test_a_failed_call_gives_its_replica_slot_back():
    gw = gateway_with(FlakyWorker(0, RuntimeError("boom")), FlakyWorker(0))
    with pytest.raises(RuntimeError):
        asyncio.run(gw.infer("b0", np.zeros((1, 3, 8, 8), np.uint8)))
    assert gw.replica_calls["b0"] == [0, 0]


@pytest.mark.parametrize("endpoint", ["classify", "classify_batch"])
def test_an_unexpected_fault_is_answered_500_with_the_request_id(endpoint):
    """Not left to the ASGI server, which would drop the client's connection and skip the metrics."""
    import io
    import json as _json

    from starlette.datastructures import FormData, UploadFile

    from service import metrics

    gw = gateway_with(FlakyWorker(0, RuntimeError("a bug of ours")))
    a = types.SimpleNamespace(route="fashion", variant="b0", how="explicit", shadow=None)
    field = "image" if endpoint == "classify" else "images"
    form = FormData([(field, UploadFile(io.BytesIO(b"png"), filename="x.png"))])

    async def parse(request, allowed):
        return form, a, 5

    async def prepare(data, variant):
        return np.zeros((1, 3, 8, 8), np.uint8)

    gw._parse, gw.prepare = parse, prepare
    counted = metrics.REQUESTS.labels(endpoint, "fashion", "b0", "500")
    before = counted._value.get()
    resp = asyncio.run(getattr(gw, endpoint)(object()))
    body = _json.loads(resp.body)
    assert resp.status_code == 500 and "RuntimeError" in body["error"]
    assert body["request_id"] == resp.headers["x-request-id"] and body["request_id"] in body["error"]
    assert counted._value.get() == before + 1


def test_concurrent_requests_for_a_variant_share_worker_calls():
    """Beyond the variant's calls in flight (2 for one worker process), waiting requests go as one call."""
    class SlowWorker(FlakyWorker):
        sizes: list = []

        async def predict(self, batch):
            self.sizes.append(len(batch))
            await asyncio.sleep(0.05)
            return await super().predict(batch)

    async def go():
        gw = gateway_with(SlowWorker(drops=0))
        return gw, await asyncio.gather(*(gw.infer("b0", np.zeros((1, 3, 8, 8), np.uint8)) for _ in range(10)))

    gw, results = asyncio.run(go())
    assert SlowWorker.sizes == [1, 1, 8] and gw.w_b0_0.calls == 3
    assert all(s.shape == (1, 3) and s[0, 1] == 1.0 and w >= 0 for s, w in results)


def test_small_images_decode_on_the_event_loop_large_ones_in_a_thread():
    """The pixel limit is checked from the header either way; only the decoding moves."""
    import threading

    from service.gateway import INLINE_DECODE_PIXELS

    gw = gateway_with(FlakyWorker(drops=0))
    gw.manifests = {"b0": types.SimpleNamespace(resolution=32, resize=None)}
    threads = []
    real = gw._pixels

    def spy(img, variant, data=None):
        threads.append(threading.get_ident())
        return real(img, variant, data)

    gw._pixels = spy
    side = int(INLINE_DECODE_PIXELS ** 0.5)
    small, large = encode(Image.new("RGB", (side, side)), "PNG"), encode(Image.new("RGB", (side + 1, side)), "PNG")
    loop_thread = threading.get_ident()
    assert asyncio.run(gw.prepare(small, "b0")).shape == (1, 3, 32, 32)
    assert asyncio.run(gw.prepare(large, "b0")).shape == (1, 3, 32, 32)
    assert threads[0] == loop_thread and threads[1] != loop_thread
    with pytest.raises(ImageError, match="above the limit"):  # refused before any decoding
        asyncio.run(gw.prepare(huge_png(), "b0"))
    assert len(threads) == 2


def test_large_decodes_wait_for_room_in_the_pixel_budget():
    """Six large images at once with room for two: never more than two decode side by side."""
    import threading
    import time

    from service.gateway import INLINE_DECODE_PIXELS

    gw = gateway_with(FlakyWorker(drops=0))
    gw.manifests = {"b0": types.SimpleNamespace(resolution=32, resize=None)}
    side = int(INLINE_DECODE_PIXELS ** 0.5) + 1
    gw.decoding = DecodeBudget(2 * side * side)
    lock, now, most = threading.Lock(), [0], [0]
    real = gw._pixels

    def slow(img, variant, data=None):
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        time.sleep(0.05)
        with lock:
            now[0] -= 1
        return real(img, variant, data)

    gw._pixels = slow
    data = encode(Image.new("RGB", (side, side)), "PNG")

    async def six():
        return await asyncio.gather(*(gw.prepare(data, "b0") for _ in range(6)))

    assert all(x.shape == (1, 3, 32, 32) for x in asyncio.run(six()))
    assert most[0] == 2 and gw.decoding.used == 0


def test_an_image_above_the_whole_budget_decodes_alone():
    budget, order = DecodeBudget(100), []

    async def take(name, pixels, hold):
        async with budget.take(pixels):
            order.append((name, "in", budget.used))
            await asyncio.sleep(hold)
        order.append((name, "out"))

    async def run():
        small = asyncio.create_task(take("small", 30, 0.05))
        await asyncio.sleep(0.01)
        await asyncio.gather(take("huge", 10_000, 0.01), small)

    asyncio.run(run())
    assert order == [("small", "in", 30), ("small", "out"), ("huge", "in", 100), ("huge", "out")]
    assert budget.used == 0 and budget.waiting == 0


# live route changes (PATCH /routes/NAME; the HTTP round trip is in test_service_http.py) --------------

def gateway_for_routes(problems=None):
    from service.gateway import GatewayLogic

    gw = object.__new__(GatewayLogic)
    gw.cfg = parse_config(CFG)
    gw.router = Router(gw.cfg, rng=random.Random(0))
    fashion = [f"f{i}" for i in range(10)]
    gw.manifests = {v: types.SimpleNamespace(classes=fashion, num_classes=10) for v in ("b0", "mec", "compact")}
    gw.manifests["lite0"] = types.SimpleNamespace(classes=[f"i{i}" for i in range(1000)], num_classes=1000)
    gw.problems = problems or {}
    gw.ready = False
    gw._init_route_changes()  # the configuration is no file here: changes stay in memory
    return gw


def test_a_route_change_moves_traffic_and_keeps_what_it_does_not_name():
    gw = gateway_for_routes()
    out = gw.change_route("fashion", {"split": {"b0": 3, "compact": 1}})
    assert out["split"] == {"b0": 0.75, "compact": 0.25} and out["previous"]["split"]["mec"] == 0.25
    assert out["shadow"] == {"variant": "mec", "fraction": 1.0}  # not named: kept
    picks = Counter(gw.router.assign("fashion").variant for _ in range(4000))
    assert set(picks) == {"b0", "compact"} and abs(picks["b0"] / 4000 - 0.75) < 0.03
    assert gw.describe_routes()["routes"]["fashion"]["split"] == {"b0": 0.75, "compact": 0.25}
    out = gw.change_route("fashion", {"shadow": None, "split": ["b0", "mec", "compact"]})
    assert out["shadow"] is None and out["split"] == {v: 1 / 3 for v in ("b0", "mec", "compact")}
    assert gw.router.assign("fashion", client_id="u1").shadow is None


def test_a_route_change_updates_the_variant_info_series():
    from prometheus_client import REGISTRY

    from service.gateway import GatewayLogic

    gw = object.__new__(GatewayLogic)
    gw.cfg = parse_config({**CFG, "routes": {**CFG["routes"], "fashion": {"split": {"b0": 1, "mec": 1}},
                                             "fashion-canary": {"split": {"compact": 1}}}})
    gw.router, gw.problems, gw.ready = Router(gw.cfg), {}, True
    gw.manifests = {v: types.SimpleNamespace(classes=list("abcdefghij") if v != "lite0" else list(range(1000)),
                                             num_classes=10, params=1, macs=2, metrics={"top1": 0.9}, resolution=32)
                    for v in CFG["variants"]}
    gw.status = {v: {"device": "cpu", "engine": {"engine": "openvino", "precision": "fp32"}} for v in CFG["variants"]}
    gw._init_route_changes()
    gw._publish_info()
    gw.change_route("fashion", {"split": {"b0": 1, "mec": 1, "compact": 1}})

    def info(routes):
        return REGISTRY.get_sample_value("effnet_variant_info", {
            "variant": "compact", "route": routes, "model": "c:latest", "params": "1", "macs": "2", "top1": "0.9",
            "resolution": "32", "device": "cpu", "engine": "openvino", "precision": "fp32"})
    assert info("fashion-canary") == 0 and info("fashion,fashion-canary") == 1


@pytest.mark.parametrize("name, change, status, message", [
    ("cats", {"split": {"b0": 1}}, 404, "unknown route 'cats'; routes: fashion, imagenet"),
    ("fashion", {"split": {"b7": 1}}, 400, "unknown variant 'b7'"),
    ("fashion", {"split": {"b0": 0, "mec": 0, "compact": 0}}, 400, "the weights sum to 0"),
    ("fashion", {"split": {"b0": 1e308, "mec": 1e308, "compact": 1e308}}, 400, "too large to add up"),
    ("fashion", {"split": {"b0": -1, "mec": 1, "compact": 1}}, 400, "expected a number >= 0, got -1"),
    ("fashion", {"split": {"b0": "half", "mec": 1, "compact": 1}}, 400, "expected a number"),
    ("fashion", {"split": {"b0": 1, "mec": 1}, "shadow": None}, 400, r"\['compact'\] would be in no route"),
    ("fashion", {"split": {"b0": 1, "lite0": 1, "mec": 1, "compact": 1}}, 400, "has 1000 classes"),
    ("fashion", {"shadow": {"variant": "mec", "fraction": 2}}, 400, "expected 0..1"),
    ("fashion", {"split": {"b0": 0, "mec": 1, "compact": 0}, "shadow": {"variant": "mec", "fraction": 0.5}}, 400,
     "'mec' already answers every request of the route"),
    ("fashion", {"weights": {"b0": 1}}, 400, 'send a JSON object with "split"'),
    ("fashion", [], 400, 'send a JSON object with "split"'),
    ("fashion", {}, 400, 'send a JSON object with "split"'),
])
def test_a_bad_route_change_is_refused_and_changes_nothing(name, change, status, message):
    gw = gateway_for_routes()
    before = gw.cfg
    with pytest.raises(Exception, match=message) as e:
        gw.change_route(name, change)
    assert e.value.status == status and gw.cfg is before and gw.router.cfg is before


def test_a_route_change_to_a_variant_that_is_not_ready_is_refused():
    gw = gateway_for_routes(problems={"compact": "variant 'compact': sha256 mismatch"})
    with pytest.raises(Exception, match="variant 'compact' is not ready: .*sha256 mismatch"):
        gw.change_route("fashion", {"split": {"compact": 1, "b0": 1}})


def gateway_on_file(path, problems=None):
    """A gateway whose configuration comes from a file, as `effnet serve` starts it (route changes saved)."""
    from service.config import load_config

    gw = gateway_for_routes(problems)
    gw.cfg = load_config(path)
    gw.router = Router(gw.cfg, rng=random.Random(0))
    gw._init_route_changes()
    return gw


def test_a_route_change_is_saved_and_served_again_after_a_restart(bentoml_home, tmp_path):
    from tests.support.serving import write_config

    path = write_config(tmp_path / "serving.yaml", CFG)
    gw = gateway_on_file(path)
    out = gw.change_route("fashion", {"split": {"b0": 1, "mec": 1, "compact": 2}})
    saved = out["saved_in"]
    assert saved and saved.startswith(str(bentoml_home))
    again = gateway_on_file(path)  # a restart: a new gateway on the same file and store
    assert again.cfg.routes["fashion"].split == {"b0": 0.25, "mec": 0.25, "compact": 0.5}
    assert again.cfg.routes["fashion"].shadow.variant == "mec"  # not named by the change: the file's
    assert again.describe_routes()["routes"]["fashion"]["changed_at"] == gw.changed_at["fashion"]
    assert again.describe_routes()["routes"]["imagenet"]["changed_at"] is None
    picks = Counter(again.router.assign("fashion").variant for _ in range(4000))
    assert abs(picks["compact"] / 4000 - 0.5) < 0.03
    # changing it back to the file's route forgets the change: nothing left to restore
    again.change_route("fashion", {"split": {"b0": 0.5, "mec": 0.25, "compact": 0.25}})
    assert not os.path.exists(saved) and again.describe_routes()["routes"]["fashion"]["changed_at"] is None
    assert gateway_on_file(path).cfg.routes == parse_config(CFG).routes


def test_an_edited_route_in_the_file_wins_over_a_saved_change(bentoml_home, tmp_path, caplog):
    from tests.support.serving import write_config

    cfg = {**CFG, "routes": {**CFG["routes"], "canary": {"split": {"b0": 1, "compact": 1}}}}
    path = write_config(tmp_path / "serving.yaml", cfg)
    gateway_on_file(path).change_route("fashion", {"split": {"b0": 1, "compact": 1}, "shadow": {"variant": "mec", "fraction": 0.1}})
    gateway_on_file(path).change_route("canary", {"split": {"b0": 1, "compact": 3}})
    edited = {**cfg, "routes": {**cfg["routes"], "fashion": {"split": {"b0": 0.2, "mec": 0.4, "compact": 0.4},
                                                             "shadow": {"variant": "mec", "fraction": 1.0}}}}
    write_config(path, edited)
    with caplog.at_level("WARNING"):
        gw = gateway_on_file(path)
    assert gw.cfg.routes["fashion"].split == {"b0": 0.2, "mec": 0.4, "compact": 0.4}  # the file's edit
    assert gw.cfg.routes["canary"].split == {"b0": 0.25, "compact": 0.75}  # the other route's change stays
    assert "the route has been edited in" in caplog.text
    assert set(json.loads(gw.route_changes_file.read_text())["routes"]) == {"canary"}  # dropped for good


def test_an_unreadable_route_changes_file_leaves_the_files_routes(bentoml_home, tmp_path, caplog):
    from service.route_state import state_path
    from tests.support.serving import write_config

    path = write_config(tmp_path / "serving.yaml", CFG)
    state = state_path(str(path))
    state.parent.mkdir(parents=True)
    base = json.dumps({"split": {"b0": 0.5, "mec": 0.25, "compact": 0.25}, "shadow": {"variant": "mec", "fraction": 1.0}})
    for junk in ("{not json", '{"version": 1, "routes": []}', '{"version": 1, "routes": {"fashion": {"base": {},'
                 ' "route": {"split": {"nope": 1}}}}}', '{"version": 1, "routes": {"fashion": {"base": {"split": [1]},'
                 ' "route": {}}}}', '{"version": 1, "routes": {"fashion": {"base": %s, "route": {"split": "b0"}}}}' % base,
                 '{"version": 1, "routes": {"fashion": {"base": %s, "route": {"split": {"nope": 1}}}}}' % base):
        state.write_text(junk)
        with caplog.at_level("WARNING"):
            assert gateway_on_file(path).cfg.routes == parse_config(CFG).routes
    assert "cannot be read" in caplog.text and "not in the expected form" in caplog.text
    assert "unknown variant 'nope'" in caplog.text  # a saved change the configuration no longer allows


def test_a_route_change_that_cannot_be_saved_is_refused_and_changes_nothing(bentoml_home, tmp_path):
    from tests.support.serving import write_config

    path = write_config(tmp_path / "serving.yaml", CFG)
    gw = gateway_on_file(path)
    gw.route_changes_file.parent.parent.mkdir(parents=True)
    gw.route_changes_file.parent.write_text("a file where the folder should be")
    before = gw.cfg
    with pytest.raises(Exception, match="could not be saved") as e:
        gw.change_route("fashion", {"split": {"b0": 1, "mec": 1, "compact": 1}})
    assert e.value.status == 500 and gw.cfg is before and gw.router.cfg is before


def test_route_changes_in_memory_are_not_saved(bentoml_home, tmp_path):
    from tests.support.serving import write_config

    path = write_config(tmp_path / "serving.yaml", {**CFG, "server": {"route_changes": "memory"}})
    out = gateway_on_file(path).change_route("fashion", {"split": {"b0": 1, "mec": 1, "compact": 1}})
    assert out["saved_in"] is None and not (bentoml_home / "effnet").exists()
    assert gateway_on_file(path).cfg.routes["fashion"].split["b0"] == 0.5
    with pytest.raises(ConfigError, match="route_changes: expected persist or memory"):
        parse_config({**CFG, "server": {"route_changes": "disk"}})


def test_effnet_serve_reset_routes_forgets_saved_changes(bentoml_home, tmp_path, capsys):
    import argparse

    from service.cli import cmd_serve
    from tests.support.serving import write_config

    path = write_config(tmp_path / "serving.yaml", CFG)
    saved = gateway_on_file(path).change_route("fashion", {"split": {"b0": 1, "mec": 1, "compact": 1}})["saved_in"]
    args = argparse.Namespace(config=str(path), host="127.0.0.1", port=3999, check=True, reset_routes=True)
    cmd_serve(args)  # --check: exits after the reset (1 here: no checkpoints in this store)
    assert not os.path.exists(saved) and "forgot the route changes saved in" in capsys.readouterr().out
    assert gateway_on_file(path).cfg.routes == parse_config(CFG).routes


@pytest.mark.parametrize("host, auth, token, proxied, status", [
    ("127.0.0.1", None, None, False, None), ("::1", None, None, False, None), ("10.1.2.3", None, None, False, 403),
    ("127.0.0.1", None, None, True, 403),  # a reverse proxy on this machine passing on a remote client
    ("10.1.2.3", "Bearer s3cret", "s3cret", False, None), ("127.0.0.1", None, "s3cret", False, 401),
    ("127.0.0.1", "Bearer wrong", "s3cret", False, 401), ("10.1.2.3", "s3cret", "s3cret", True, None),
])
def test_route_changes_need_this_machine_or_the_admin_token(host, auth, token, proxied, status):
    from service.gateway import admin_refusal

    refusal = admin_refusal(host, auth, token, proxied)
    assert (refusal[0] if refusal else None) == status


def test_workers_load_side_by_side_unless_auto_must_time(monkeypatch):
    """One core slot per load where nothing is timed; every slot where `auto` times its candidates."""
    import contextlib

    import engines.loader
    from service.workers import loading_slots

    class Slots:
        def hold(self, most):
            return f"hold({most})"

        def hold_all(self):
            return "hold_all"

    cfg = parse_config(CFG)
    recorded = {"b0": "openvino", "mec": None}
    monkeypatch.setattr(engines.loader, "recorded_choice", lambda tag, **kw: recorded[tag.split(":")[0]])
    auto = lambda name: replace(cfg.variants[name], engine="auto")  # noqa: E731
    assert loading_slots(Slots(), auto("b0"), "cpu", (1, 8), 2) == "hold(1)"
    assert loading_slots(Slots(), auto("mec"), "cpu", (1, 8), 2) == "hold_all"
    assert loading_slots(Slots(), replace(auto("mec"), engine="onnxruntime"), "cpu", (1, 8), 2) == "hold(1)"
    assert isinstance(loading_slots(None, auto("mec"), "cuda", (1, 8), 2), contextlib.nullcontext)


def test_gpu_engine_calls_all_run_on_one_thread_cpu_calls_in_place():
    """cuDNN's benchmarked plans are cached per thread in PyTorch: a GPU worker's warm-up only counts if
    its requests run on the same thread (the H200 stalls). Called here from many threads, as BentoML does."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from service.workers import DeviceThread

    on_gpu, on_cpu = DeviceThread("cuda"), DeviceThread("cpu")
    with ThreadPoolExecutor(8) as callers:
        gpu_threads = set(callers.map(lambda _: on_gpu(threading.get_ident), range(64)))
        pairs = list(callers.map(lambda _: (threading.get_ident(), on_cpu(threading.get_ident)), range(64)))
    assert len(gpu_threads) == 1 and threading.get_ident() not in gpu_threads
    assert all(caller == ran for caller, ran in pairs)
    assert on_gpu(lambda a, b=0: a + b, 2, b=3) == 5
    with pytest.raises(ZeroDivisionError):  # an engine's error reaches the request, as before
        on_gpu(lambda: 1 / 0)


def test_worker_errors_become_502_or_503_with_retry_after():
    from bentoml.exceptions import InternalServerError, ServiceUnavailable

    from service.gateway import ClientError

    with pytest.raises(ClientError) as e:
        asyncio.run(gateway_with(FlakyWorker(drops=5)).infer("b0", np.zeros((1, 3, 8, 8), np.uint8)))
    assert e.value.status == 502
    with pytest.raises(ClientError) as e:
        asyncio.run(gateway_with(FlakyWorker(0, ServiceUnavailable("busy"))).infer("b0", np.zeros((1, 3, 8, 8), np.uint8)))
    assert e.value.status == 503 and e.value.headers["Retry-After"] == "1"
    with pytest.raises(ClientError) as e:
        asyncio.run(gateway_with(FlakyWorker(0, InternalServerError("boom"))).infer("b0", np.zeros((1, 3, 8, 8), np.uint8)))
    assert e.value.status == 502
    # aiohttp's total timeout (bentoml 1.4.30's client) and its socket timeout: 503, not a 500
    import aiohttp

    for timeout in (asyncio.TimeoutError(), aiohttp.ServerTimeoutError("read timed out")):
        with pytest.raises(ClientError) as e:
            asyncio.run(gateway_with(FlakyWorker(0, timeout)).infer("b0", np.zeros((1, 3, 8, 8), np.uint8)))
        assert e.value.status == 503 and e.value.headers["Retry-After"] == "1"


def test_effnet_serve_refuses_a_route_whose_variants_disagree_on_classes(bentoml_home, tmp_path, capsys):
    import argparse

    from service.cli import cmd_serve
    from tests.support.serving import make_checkpoint, write_config

    make_checkpoint(bentoml_home, "compact-a", "compact", ["cat", "dog"], 32)
    make_checkpoint(bentoml_home, "compact-b", "compact", ["cat", "fox"], 32)
    cfg = write_config(tmp_path / "bad.yaml", {
        "variants": {"a": {"model": "compact-a:latest"}, "b": {"model": "compact-b:latest"}},
        "routes": {"pets": {"split": ["a", "b"]}},
    })
    assert cmd_serve(argparse.Namespace(config=str(cfg), host="127.0.0.1", port=3999)) == 2
    err = capsys.readouterr().err
    assert "route 'pets': variant 'b' (compact-b:latest) has 2 classes" in err and "'a'" in err


def test_worker_batch_sizes_are_exact_for_small_maxima_else_powers_of_two():
    """Static-shape engines pad each batch to the next size: a variant batching at most 8 (large inputs)
    compiles every size, larger maxima waste at most half of a batch."""
    from service.config import VariantConfig

    assert VariantConfig("v", "m:latest", max_batch_size=8).batch_sizes == (1, 2, 3, 4, 5, 6, 7, 8)
    assert VariantConfig("v", "m:latest", max_batch_size=4).batch_sizes == (1, 2, 3, 4)
    assert VariantConfig("v", "m:latest", max_batch_size=12).batch_sizes == (1, 2, 4, 8, 12)
    assert VariantConfig("v", "m:latest", max_batch_size=32).batch_sizes == (1, 2, 4, 8, 16, 32)
    assert VariantConfig("v", "m:latest", max_batch_size=1).batch_sizes == (1,)


def test_gateway_calls_in_flight_default_to_two_per_worker_process_and_can_be_set(tmp_path):
    from service.config import ConfigError, VariantConfig, load_config

    assert VariantConfig("v", "m:latest").gateway_calls == 2
    assert VariantConfig("v", "m:latest", workers=2).gateway_calls == 4
    assert VariantConfig("v", "m:latest", workers=2, calls_in_flight=1).gateway_calls == 1
    cfg = tmp_path / "c.yaml"
    body = "variants:\n  a: {model: 'a:latest', calls_in_flight: %s}\nroutes:\n  r: {split: [a]}\n"
    cfg.write_text(body % "3")
    assert load_config(cfg).variants["a"].gateway_calls == 3
    for bad in ("0", "-1", "two"):
        cfg.write_text(body % bad)
        with pytest.raises(ConfigError, match="calls_in_flight"):
            load_config(cfg)


def test_placement_is_worker_or_gateway_and_in_the_gateway_one_call_per_stream(tmp_path):
    from service.config import ConfigError, VariantConfig, load_config

    assert VariantConfig("v", "m:latest").placement == "worker"
    # in the gateway a call beyond the streams would only wait for one, unbatched
    assert VariantConfig("v", "m:latest", workers=2, placement="gateway").gateway_calls == 2
    assert VariantConfig("v", "m:latest", placement="gateway", calls_in_flight=3).gateway_calls == 3
    cfg = tmp_path / "c.yaml"
    body = "variants:\n  a: {model: 'a:latest', placement: %s}\nroutes:\n  r: {split: [a]}\n"
    cfg.write_text(body % "gateway")
    assert load_config(cfg).variants["a"].placement == "gateway"
    for bad in ("inline", "Gateway", "1", "[gateway]"):
        cfg.write_text(body % bad)
        with pytest.raises(ConfigError, match=r"variants\.a\.placement: expected worker or gateway"):
            load_config(cfg)


def test_serve_prepare_records_the_engine_each_worker_will_load(bentoml_home, tmp_path, capsys):
    """`make engines` (`effnet serve --prepare`) exports, verifies and times each variant as its worker
    will, so the worker's own load finds auto's choice recorded and only builds the winner."""
    import argparse

    from engines import load_engine
    from service.cli import cmd_serve
    from tests.support.serving import make_checkpoint, write_config

    make_checkpoint(bentoml_home, "compact-a", "compact", ["cat", "dog"], 32)
    cfg = write_config(tmp_path / "c.yaml", {
        "server": {"cpu_threads": 2},
        "variants": {"a": {"model": "compact-a:latest", "engine": "auto", "max_batch_size": 2}},
        "routes": {"pets": {"split": ["a"]}},
    })
    check = argparse.Namespace(config=str(cfg), host="127.0.0.1", port=3999, prepare=False, check=True)
    assert cmd_serve(check) == 1  # `make serve` then runs `make checkpoints engines`
    assert "variant 'a': engine auto has not chosen for cpu, 2 thread(s), batch sizes [1, 2]" in capsys.readouterr().err
    args = argparse.Namespace(config=str(cfg), host="127.0.0.1", port=3999, prepare=True)
    assert cmd_serve(args) == 0
    assert cmd_serve(check) == 0  # prepared: `make serve` goes straight to serving
    out = capsys.readouterr().out
    assert "[a] compact" in out  # step 1: the export's own report, prefixed with the variant
    assert "auto: fastest verified engine at batch [1, 2]" in out
    eng, _ = load_engine("compact-a:latest", engine="auto", threads=2, batch_sizes=(1, 2))
    assert eng.describe()["reason"].startswith("auto: recorded choice")
    # A variant whose checkpoint is missing: nothing to prepare, said plainly, exit status 1.
    cfg = write_config(tmp_path / "missing.yaml", {"variants": {"a": {"model": "nowhere:latest"}},
                                                   "routes": {"pets": {"split": ["a"]}}})
    assert cmd_serve(argparse.Namespace(config=str(cfg), host="127.0.0.1", port=3999, prepare=True)) == 1
    assert "nowhere" in capsys.readouterr().err
    assert cmd_serve(argparse.Namespace(config=str(cfg), host="127.0.0.1", port=3999, check=True)) == 1
    err = capsys.readouterr().err
    assert "variant 'a'" in err and "nowhere" in err


@pytest.mark.parametrize("text, ok", [("3000", True), ("1", True), ("65535", True), ("0", False), ("99999", False),
                                      ("http", False)])
def test_serve_takes_only_real_port_numbers(text, ok):
    import argparse

    from service.cli import port_number

    if ok:
        assert port_number(text) == int(text)
    else:
        with pytest.raises(argparse.ArgumentTypeError):
            port_number(text)


def test_serve_says_when_its_port_is_taken():
    import socket

    from service.cli import port_in_use

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert "in use" in port_in_use("127.0.0.1", port)
    assert port_in_use("127.0.0.1", port) is None


def test_response_media_types_are_worked_out_once_and_stay_what_bentoml_says():
    """service.workers.cache_media_types: the same answers as BentoML's own, without a JSON schema
    built per response."""
    import bentoml

    from service.workers import cache_media_types

    @bentoml.service
    class Kinds:
        @bentoml.api
        def array(self, x: np.ndarray) -> np.ndarray:
            return x

        @bentoml.api
        def text(self, x: str) -> str:
            return x

        @bentoml.api
        def mapping(self, x: int) -> dict:
            return {}

    assert cache_media_types() and cache_media_types()  # applied once, and idempotent
    specs = [Kinds.apis[n].output_spec for n in ("array", "text", "mapping")]
    assert [s.mime_type() for s in specs] == ["application/json", "text/plain", "application/json"]
    built = []
    real = specs[0].model_json_schema
    specs[0].model_json_schema = classmethod(lambda cls, *a, **k: built.append(1) or real(*a, **k))
    try:
        assert specs[0].mime_type() == "application/json" and built == []
    finally:
        specs[0].model_json_schema = real


def test_the_workers_batcher_does_not_hold_requests_back_by_a_learned_wait():
    """After a burst BentoML's batcher had learned to wait ~100 ms for batch-mates and kept doing so
    for lone requests (service.workers.dispatch_without_learned_wait). Its per-item time estimates,
    which the 503 load shedding uses, are still learned."""
    from bentoml._internal.marshal.dispatcher import Optimizer

    from service.workers import dispatch_without_learned_wait

    assert dispatch_without_learned_wait()
    opt = Optimizer(max_latency=10.0)
    for n in (1, 2, 4, 8) * 5:
        opt.log_outbound(n=n, wait=0.1, duration=0.01 * n + 0.002)  # a burst: every batch waited 100 ms
    opt.trigger_refresh()
    assert opt.wait == 0
    assert opt.o_a == pytest.approx(0.01, rel=0.05) and opt.o_b == pytest.approx(0.002, abs=0.001)


def test_a_gpu_variant_in_the_gateway_makes_bentoml_give_the_gateway_a_gpu(monkeypatch):
    """BentoML's allocator sets CUDA_VISIBLE_DEVICES only for services that ask for GPUs; a GPU
    variant placed in the gateway must make the gateway ask, as its worker would have. Services are
    only declared here (no CUDA needed); nothing is loaded."""
    from service import app

    cfg = parse_config({"variants": {"a": {"model": "a:latest", "gpu": 1, "placement": "gateway"},
                                     "b": {"model": "b:latest", "gpu": 0.5}},
                        "routes": {"r": {"split": ["a", "b"]}}})
    monkeypatch.setattr(app, "_gpu_present", lambda: True)
    on_gpu = app.build_gateway(cfg)
    assert on_gpu.config["resources"] == {"gpu": 1}
    assert set(on_gpu.dependencies) == {"w_b_1"}  # no worker service for the variant in the gateway
    monkeypatch.setattr(app, "_gpu_present", lambda: False)
    assert "resources" not in app.build_gateway(cfg).config


def test_effnet_serve_says_which_variants_run_inside_the_gateway(bentoml_home, tmp_path, capsys, monkeypatch):
    import argparse

    from service import cli
    from tests.support.serving import write_config

    started = []
    monkeypatch.setattr(cli.os, "execvpe", lambda *a: started.append(a))  # stop short of `bentoml serve`
    cfg = {**CFG, "variants": {**CFG["variants"], "mec": {**CFG["variants"]["mec"], "placement": "gateway"}}}
    path = write_config(tmp_path / "serving.yaml", cfg)
    cli.cmd_serve(argparse.Namespace(config=str(path), host="127.0.0.1", port=free_port()))
    out = capsys.readouterr().out
    assert started and "served inside the gateway process (placement: gateway, no HTTP hop): mec\n" in out
    cli.cmd_serve(argparse.Namespace(config=str(write_config(tmp_path / "w.yaml", CFG)), host="127.0.0.1",
                                     port=free_port()))
    assert "inside the gateway" not in capsys.readouterr().out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_variant_is_ready_once_the_processes_it_runs_have_loaded_not_its_workers_setting():
    """On a GPU one process holds the device whatever `workers` says; readiness must count that one,
    or a `gpu: 1, workers: 2` variant (lite0 in service/config.yaml) never gets ready."""
    from service.config import VariantConfig
    from service.workers import VariantRunner, combine_status, worker_names

    v = VariantConfig("l_x", "l:latest", gpu=1, workers=2)
    assert worker_names(v, gpu_present=True) == ["effnet-worker-l-x"]
    assert worker_names(v, gpu_present=False) == ["effnet-worker-l-x-1", "effnet-worker-l-x-2"]
    runner = object.__new__(VariantRunner)  # no engines loaded: only the status is under test
    runner.v, runner.error, runner.device, runner.engine = v, None, "cuda", None
    one = runner.status(2, 1, 1)
    assert one["ready"] and one["workers"] == 1
    assert combine_status([one]) == one
    both = combine_status([one, one])
    assert both["ready"] and (both["workers"], both["workers_loaded"]) == (2, 2) and both["error"] is None
    runner.error = "variant 'l_x', checkpoint 'l:latest': sha256 mismatch"
    failed = runner.status(2, 0, 1)
    pending = combine_status([one, failed])
    assert not pending["ready"] and pending["workers_loaded"] == 1 and pending["error"] == runner.error


def test_a_variant_in_the_gateway_loads_in_a_thread_and_answers_503_until_it_has(monkeypatch):
    """`placement: gateway` must not hold the gateway's start-up (and /livez) while its engines load."""
    import threading

    from service import inprocess
    from service.config import VariantConfig

    release = threading.Event()
    built = []

    class SlowRunner:  # stands in for VariantRunner: loading an engine takes until `release`
        def __init__(self, v, cfg, use_gpu):
            assert release.wait(10)
            self.error = None if len(built) < 1 else "variant 'a', checkpoint 'a:latest': sha256 mismatch"
            built.append(self)

        def status(self, threads, loaded, wanted, placement):
            return {"ready": self.error is None and loaded >= wanted, "error": self.error, "placement": placement}

        def predict(self, batch):
            return np.zeros((len(batch), 3), np.float32)

    monkeypatch.setattr(inprocess, "VariantRunner", SlowRunner)
    cfg = parse_config(CFG)
    local = inprocess.InProcessVariant(VariantConfig("a", "a:latest", workers=2, placement="gateway"), cfg, False)
    # constructed at once, while the first runner still loads
    st = local.status()
    assert not st["ready"] and "loading in the gateway process (0 of 2 streams loaded)" in st["error"]
    from bentoml.exceptions import ServiceUnavailable

    with pytest.raises(ServiceUnavailable, match="loading"):
        asyncio.run(local.predict(np.zeros((1, 3, 8, 8), np.uint8)))
    release.set()
    local._loader.join(10)
    # the second stream's checkpoint failed: not ready, with that reason, not "loading"
    st = local.status()
    assert not st["ready"] and "sha256 mismatch" in st["error"] and not local.loaded


def test_a_gateway_variant_that_loaded_serves_from_its_streams(monkeypatch):
    from service import inprocess
    from service.config import VariantConfig

    class Runner:
        def __init__(self, v, cfg, use_gpu):
            self.error = None

        def status(self, threads, loaded, wanted, placement):
            return {"ready": loaded >= wanted, "error": None, "workers_loaded": loaded}

        def predict(self, batch):
            return np.ones((len(batch), 3), np.float32)

    monkeypatch.setattr(inprocess, "VariantRunner", Runner)
    local = inprocess.InProcessVariant(VariantConfig("a", "a:latest", workers=2, placement="gateway"),
                                       parse_config(CFG), False)
    local._loader.join(10)
    assert local.loaded and local.status() == {"ready": True, "error": None, "workers_loaded": 2}
    assert asyncio.run(local.predict(np.zeros((2, 3, 8, 8), np.uint8))).shape == (2, 3)
