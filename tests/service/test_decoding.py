"""Image bytes -> pixels (service.images, service.decode): every mode, orientation and limit."""
import asyncio
import base64
import io

import numpy as np
import pytest
from PIL import Image

from service.images import DecodeBudget, ImageError, decode_image
from tests.service.fakes import RGB, encode, huge_png


def decoder(budget=100_000_000):
    """A decoder for variant b0 at 32x32, under the default limits."""
    import types

    from service.decode import Decoder

    return Decoder({"b0": types.SimpleNamespace(resolution=32, resize=None)}, 40_000_000, budget)


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
    from tests.service.fakes import photos

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
    from tests.service.fakes import photos

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
    from tests.service.fakes import photos

    data = photos(224)[1]
    at = data.index(b"\xff\xda")  # start of scan
    padded = data[:at] + b"\x00\x00\x00" + data[at:]
    assert np.array_equal(decode_image(padded, max_pixels=10**6), decode_image(data, max_pixels=10**6))


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


def test_small_images_decode_on_the_event_loop_large_ones_in_a_thread():
    """The pixel limit is checked from the header either way; only the decoding moves."""
    import threading

    from service.decode import INLINE_DECODE_PIXELS

    gw = decoder()
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

    from service.decode import INLINE_DECODE_PIXELS

    side = int(INLINE_DECODE_PIXELS ** 0.5) + 1
    gw = decoder(budget=2 * side * side)
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
    assert most[0] == 2 and gw.budget.used == 0


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
