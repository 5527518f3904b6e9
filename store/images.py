"""Image files -> uint8 (3, H, W) RGB arrays: the one decoder of the service and the trainer.

It lives in `store` so that training decodes an ImageFolder exactly as the service decodes a request,
without importing the service. What it guarantees:
- the format is sniffed from the bytes and must be one of `ALLOWED_FORMATS` (a name or content type
  is never trusted);
- the pixel count is read from the header and checked before any pixel is decoded, so a small file
  that declares a huge image costs nothing;
- truncated files are errors (PIL's LOAD_TRUNCATED_IMAGES stays off);
- EXIF orientation is applied; GIFs give their first frame;
- RGB and gray JPEGs are decoded by simplejpeg (libjpeg-turbo), at a reduced scale where the caller
  needs less, and refused when libjpeg-turbo finds their data cut short or damaged; CMYK and YCCK
  JPEGs are checked the same way and then decoded by PIL, as the other formats are;
- every mode becomes 8-bit RGB: 16/32-bit and float grayscale are scaled, alpha and palette
  transparency are composited over white, CMYK/YCbCr/LAB/HSV go through PIL's conversion.
The model-specific part (resize, crop, gray vs RGB) is `store.resize_crop` and `store.InputNormalizer`,
read from each checkpoint's manifest.
"""
from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

ImageFile.LOAD_TRUNCATED_IMAGES = False
# PIL's format names; sniffed from the bytes by PIL's per-format `_accept` checks.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
# EXIF orientation -> the transpose that displays the image upright (as ImageOps.exif_transpose).
ORIENTATION_TAG = 0x0112
TRANSPOSE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


# Signatures of formats clients send by mistake, so a refusal can say what the file is. The allowed
# ones are here too: PIL answers "cannot identify" for a PNG with a broken header as for random bytes.
SIGNATURES = (
    (0, b"\xff\xd8\xff", "JPEG"), (0, b"\x89PNG\r\n\x1a\n", "PNG"), (0, b"GIF87a", "GIF"),
    (0, b"GIF89a", "GIF"), (8, b"WEBP", "WEBP"), (0, b"BM", "BMP"),
    (0, b"II*\x00", "TIFF"), (0, b"MM\x00*", "TIFF"), (0, b"%PDF", "PDF"), (0, b"8BPS", "PSD"),
    (0, b"\x00\x00\x01\x00", "ICO"), (0, b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (0, b"\xffO\xffQ", "JPEG 2000"), (0, b"\xff\x0a", "JPEG XL"), (0, b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
)
# "BM" alone starts plenty of text: a BMP also has one of the known DIB header sizes at byte 14.
BMP_HEADER_SIZES = {12, 16, 40, 52, 56, 64, 108, 124}
# ISO base media files (box "ftyp" at byte 4) by their major brand.
FTYP_BRANDS = {b"avif": "AVIF", b"avis": "AVIF", b"mif1": "HEIF", b"msf1": "HEIF", b"heic": "HEIC",
               b"heix": "HEIC", b"hevc": "HEIC", b"heim": "HEIC", b"heis": "HEIC", b"hevm": "HEIC", b"hevs": "HEIC"}


def sniff_format(data: bytes) -> str | None:
    """What the bytes look like, for error messages only ("TIFF", "HEIC", "SVG", "base64 text"...)."""
    for offset, magic, name in SIGNATURES:
        if data[offset:offset + len(magic)] == magic and (name != "WEBP" or data[:4] == b"RIFF") and (
                name != "BMP" or int.from_bytes(data[14:18], "little") in BMP_HEADER_SIZES):
            return name
    if data[4:8] == b"ftyp":
        return FTYP_BRANDS.get(data[8:12], "an ISO media file (MP4/MOV/HEIF family)")
    head = data[:1024].lstrip().lower()
    if head.startswith(b"data:"):
        return "a data: URL"
    if head.startswith((b"<?xml", b"<svg")) and b"<svg" in head:
        return "SVG"
    if head.startswith((b"<!doctype html", b"<html")):
        return "HTML"
    try:  # base64 of an image: a client that encoded the file instead of uploading its bytes
        import base64
        inner = base64.b64decode(data[:64].strip(), validate=True)
    except ValueError:
        return None
    return "base64 text" if any(inner[o:o + len(m)] == m for o, m, _ in SIGNATURES) else None


def _unreadable(data: bytes) -> str:
    """The message for bytes PIL cannot open: corrupt allowed format, other format, or unknown."""
    kind = sniff_format(data)
    if kind in ALLOWED_FORMATS:
        return f"the {kind} image is truncated or corrupt: its header cannot be read"
    allowed = f"{', '.join(ALLOWED_FORMATS[:-1])} or {ALLOWED_FORMATS[-1]}"
    if kind in ("base64 text", "a data: URL"):
        return (f"the file is {kind}, not image bytes: upload the image file itself "
                f"(curl -F image=@photo.jpg), not its base64 encoding")
    if kind:
        return f"{kind} is not a supported image format: send {allowed} (convert it first)"
    return (f"not a supported image: the bytes are not {allowed} "
            f"(the format is read from the file's content, not its name or content type)")


class ImageError(ValueError):
    """An image the service refuses; `status` is the HTTP status to answer with (400 or 413)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _white_level(img: Image.Image) -> float:
    """The value that becomes 255 for 16/32-bit integer and float grayscale: read from the whole image,
    so that strips converted one by one (`_reduced_rgb`) are scaled alike."""
    if img.mode.startswith("I;16"):
        return 65535.0
    _, high = img.getextrema()
    if img.mode == "F":
        return 1.0 if high <= 1.0 else 255.0
    return 65535.0 if high > 255 else 255.0


def _to_rgb(img: Image.Image, white: float | None = None) -> Image.Image:
    mode = img.mode
    if mode.startswith("I") or mode == "F":  # 16/32-bit integer or float grayscale
        a = np.asarray(img, dtype=np.float64)
        top = white or _white_level(img)
        a = np.nan_to_num(a / top * 255.0 + 0.5, nan=0.0)
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    elif mode == "P" or mode == "PA":
        img = img.convert("RGBA")  # keeps palette transparency as alpha
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        # NOTE: transparent pixels become white, as a viewer shows them on a white page.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        img = background
    return img if img.mode == "RGB" else img.convert("RGB")


# Pixels converted at a time when a large image of another mode than RGB or L is reduced before its
# conversion: 16-bit grayscale takes 8 bytes per pixel three times over in `_to_rgb` (float64), so a
# strip costs about 6 MB however large the image (a 6000x6000 16-bit PNG: 79 MiB peak instead of 1,072;
# benchmarks/serving.md).
STRIP_PIXELS = 1 << 18
# Bytes per pixel of an image as PIL holds it decoded (multi-band modes take 4, RGB included), and the
# extra bytes per pixel that `_to_rgb` allocates when it converts a whole image at once: palette and
# alpha images go through two RGBA copies and RGB, 16/32-bit gray through three float64 arrays.
STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
CONVERSION_BYTES = {"RGB": 0, "P": 12, "PA": 12, "RGBA": 12, "LA": 12, "RGBa": 12, "La": 12, "I": 25, "F": 25,
                    "I;16": 25, "I;16L": 25, "I;16B": 25, "I;16N": 25}


def _reduce_factor(size: tuple[int, int], min_side: int | None) -> int:
    """The box reduction that keeps the shorter side at 2 x min_side or more (1: none)."""
    return max(1, min(size) // (2 * min_side)) if min_side else 1


def decode_bytes(img: Image.Image, min_side: int | None = None) -> int:
    """About the most memory that `to_rgb_array` takes for `img` (from `open_image`), from its header.

    The decoded pixels at full size (bytes per pixel of the mode), plus, for an image converted whole,
    its conversion to RGB and the returned array; a large image is reduced before its conversion, and
    then its decoded pixels are nearly all it costs. A JPEG decoded at a reduced scale costs less.
    """
    w, h = img.size
    stored = STORED_BYTES.get(img.mode, 4)
    if _reduce_factor(img.size, min_side) > 1:
        return w * h * stored
    return w * h * (stored + CONVERSION_BYTES.get(img.mode, 4) + 6)  # 6: the (H, W, 3) array and its transpose


def _reduced_rgb(img: Image.Image, factor: int) -> Image.Image:
    """`img` (any mode but RGB and L) as RGB, box-reduced by `factor`, converted one strip at a time.

    Converting a 36 MP palette or RGBA image whole takes three 4-byte copies of it, a 16-bit one three
    float64 arrays (about 1 GB); strips bound that to STRIP_PIXELS. PIL cannot reduce P and I;16
    images itself, and resizing P (nearest only) would alias. Box-reducing to at least twice the size
    the caller needs, then resizing with antialiasing, gives what resizing the whole image does to
    within a grey level or two.
    """
    w, h = img.size
    white = _white_level(img) if img.mode.startswith("I") or img.mode == "F" else None
    rows = factor * max(1, STRIP_PIXELS // (w * factor))
    out = Image.new("RGB", (-(-w // factor), -(-h // factor)))
    for top in range(0, h, rows):
        strip = _to_rgb(img.crop((0, top, w, min(h, top + rows))), white)
        out.paste(strip.reduce(factor), (0, top // factor))
    return out


def open_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Read only the header: the format must be allowed and the declared size within `max_pixels`.

    Cheap at any declared size (no pixel is decoded), so the gateway can call it on its event loop
    and then decide where the decoding runs. Raises ImageError (400, or 413 for too many pixels).
    """
    if not data:
        raise ImageError("the image file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides below
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise ImageError(_unreadable(data)) from None
    except Image.DecompressionBombError as e:  # above twice PIL's own limit: refused while opening
        # PIL's words ("exceeds limit of 178956970 pixels, could be decompression bomb DOS attack") name
        # its limit, not ours: say it as the check below does.
        n = re.search(r"\((\d+) pixels\)", str(e))
        declared = f"{int(n.group(1)):,} pixels" if n else "too many pixels"
        raise ImageError(f"the image declares {declared}, above the limit of {max_pixels:,}", status=413) from None
    except Exception as e:  # a header PIL cannot parse
        kind = sniff_format(data)
        if kind not in ALLOWED_FORMATS:  # e.g. text that starts with "BM": PIL's BMP reader tried it
            raise ImageError(_unreadable(data)) from None
        raise ImageError(f"the {kind} image is truncated or corrupt: its header cannot be read ({e})") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError(f"the image declares an empty size {w}x{h}")
    if w * h > max_pixels:
        raise ImageError(f"the image declares {w}x{h} = {w * h:,} pixels, above the limit of {max_pixels:,}", status=413)
    return img


# libjpeg-turbo's warnings that real cameras and editors produce on files that display correctly:
# padding bytes where a marker is due. Anything else it warns about (data that ends before the last
# pixel, a bad Huffman code, a lost restart marker) refuses the image.
BENIGN_JPEG_WARNINGS = ("extraneous bytes before marker",)


def _decode_jpeg(data: bytes, min_side: int | None, colorspace: str = "RGB") -> np.ndarray | None:
    """uint8 (H, W, C) in `colorspace` of a JPEG through simplejpeg (libjpeg-turbo): at the smallest
    DCT scale (1/8..1) whose sides both still cover `min_side`, as PIL's `draft` picks. Raises
    ImageError (400) for data that is cut short or damaged; None for a file with only a benign flaw
    (`BENIGN_JPEG_WARNINGS`), which PIL then decodes (simplejpeg refuses those even when not strict:
    its header reader stops at the warning).

    libjpeg recovers from a file cut short by filling the missing rows with grey and a warning on
    stderr, which PIL and torchvision.io pass on as a valid image; simplejpeg's `strict` turns those
    warnings into errors. Its pixels equal PIL's for the benchmark's photos, in 117-163 us against
    167-220 for torchvision.io (224x224 JPEGs, one thread).
    """
    import simplejpeg

    size = {"min_height": min_side, "min_width": min_side} if min_side else {}
    try:
        return simplejpeg.decode_jpeg(data, colorspace=colorspace, strict=True, **size)
    except ValueError as e:
        problem = str(e)
    if any(w in problem for w in BENIGN_JPEG_WARNINGS):
        return None
    raise ImageError(f"the JPEG image is truncated or corrupt: {problem}")


def _orientation(img: Image.Image) -> int | None:
    try:
        return img.getexif().get(ORIENTATION_TAG)
    except Exception:
        return None  # an unreadable EXIF block: keep the pixels as stored rather than refuse the image


def to_rgb_array(img: Image.Image, *, min_side: int | None = None, data: bytes | None = None) -> np.ndarray:
    """Decode an image from `open_image` to a contiguous uint8 array (3, H, W) in RGB.

    `min_side`: the smallest shorter side the caller needs; JPEGs are then decoded at a reduced
    scale (DCT scaling, 1/2..1/8) that still covers it, and RGB or gray images above twice that are
    resized to it: the caller's resize then has nothing left to do, and large images are cheap.
    `data`: the file's bytes; given, RGB and gray JPEGs go to simplejpeg (`_decode_jpeg`).
    Raises ImageError (400) for truncated or corrupt pixel data.
    """
    fmt = img.format
    hwc = _decode_jpeg(data, min_side) if data is not None and fmt == "JPEG" and img.mode in ("RGB", "L") else None
    if hwc is not None:
        orientation = _orientation(img)  # a JPEG's EXIF block precedes its pixels: read with the header
        if orientation not in TRANSPOSE_FOR_ORIENTATION and not (min_side and min(hwc.shape[:2]) > 2 * min_side):
            return np.ascontiguousarray(hwc.transpose(2, 0, 1))
        img = Image.fromarray(hwc)  # to be resized or turned upright below, as PIL's own decoding would be
    else:
        if data is not None and fmt == "JPEG" and img.mode == "CMYK":
            # Only checked by simplejpeg (a decode at the reduced scale, its pixels unused): PIL, which then
            # decodes, converts CMYK and Adobe's inverted YCCK, but greys in a file cut short as for RGB.
            _decode_jpeg(data, min_side, colorspace="CMYK")
        try:
            if min_side and fmt == "JPEG":
                img.draft("RGB", (min_side, min_side))
            img.seek(0)  # GIF/WebP animations: the first frame
            img.load()
        except Exception as e:  # truncated or corrupt pixel data; PIL raises OSError, SyntaxError, ValueError...
            raise ImageError(f"the {fmt} image is truncated or corrupt: {e}") from None
        orientation = _orientation(img)  # after loading: a PNG may keep its eXIf chunk after the pixels
        factor = _reduce_factor(img.size, min_side)
        if factor > 1 and img.mode not in ("RGB", "L"):
            try:
                img = _reduced_rgb(img, factor)
            except Exception as e:
                raise ImageError(f"the {fmt} image in mode {img.mode} cannot be converted to RGB: {e}") from None
    if min_side and min(img.size) > 2 * min_side and img.mode in ("RGB", "L"):
        # Large images are resized here, by PIL, to the size store.resize_crop would give them, which then
        # has nothing to resize: PIL's antialiased bilinear and torchvision's agree within one grey level
        # (a test checks it), and this skips three full-size copies (150-180 ms for a 4000x3000 PNG).
        # Box-averaging (Image.reduce) is 1-4 grey levels off; other modes (P, 1, RGBA...) resize differently.
        w, h = img.size
        short, long = min(w, h), max(w, h)
        long = int(min_side * long / short)
        img = img.resize((long, min_side) if w >= h else (min_side, long), Image.BILINEAR)
    if orientation in TRANSPOSE_FOR_ORIENTATION:
        img = img.transpose(TRANSPOSE_FOR_ORIENTATION[orientation])
    try:
        rgb = _to_rgb(img)
    except Exception as e:
        raise ImageError(f"the {fmt} image in mode {img.mode} cannot be converted to RGB: {e}") from None
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1))


def decode_image(data: bytes, *, max_pixels: int, min_side: int | None = None) -> np.ndarray:
    """`open_image` then `to_rgb_array`: untrusted bytes -> uint8 (3, H, W) RGB, or an ImageError."""
    return to_rgb_array(open_image(data, max_pixels=max_pixels), min_side=min_side, data=data)
