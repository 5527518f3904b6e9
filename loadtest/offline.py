"""Offline evaluation of the very images the load test sends: the reference for accuracy under load.

Each image's bytes are decoded, resized and cropped (`store.resize_crop`) and classified by
`engines.load_engine(tag)` outside the service, on the engine the service reports for the variant
(the eager reference when it does not say). The load test then
checks, image by image, that the service answered the same top-1 under load.
"""
from __future__ import annotations

import io
from typing import Iterable

import torch

from store import Manifest, resize_crop

from .images import LabelledImage


def decode(data: bytes, manifest: Manifest) -> torch.Tensor:
    """Encoded image -> uint8 (C,H,W), decoded as the service decodes it (`service.images`), so the
    comparison checks the serving path (transport, batching, workers) and not two decoders."""
    try:
        from service.images import decode_image
    except ImportError:  # the service is not installed: plain PIL, same result for these PNGs/photos
        decode_image = None
    if decode_image is not None:
        arr = decode_image(data, max_pixels=1 << 40, min_side=manifest.resize or manifest.resolution)
        return torch.from_numpy(arr)
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as img:
        arr = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def evaluate(tag: str, images: Iterable[LabelledImage], home: str | None = None, threads: int = 1,
             batch: int = 64, engine_name: str = "torch") -> dict[str, int]:
    """{image id: top-1 class index} of checkpoint `tag` on `images`, with the named engine (the one
    the service runs the variant on, so a difference points at the serving path, not the engine)."""
    from engines import load_engine

    try:
        engine, manifest = load_engine(tag, engine=engine_name, threads=threads, home=home)
    except ValueError:  # an engine name this build does not know: the eager reference
        engine, manifest = load_engine(tag, threads=threads, home=home)
    images = list(images)
    out: dict[str, int] = {}
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        x = torch.cat([resize_crop(decode(im.data, manifest), manifest) for im in chunk])
        top1 = engine(x).argmax(1).tolist()
        out.update({im.id: int(p) for im, p in zip(chunk, top1)})
    return out


def accuracy(top1: dict[str, int], images: Iterable[LabelledImage]) -> tuple[int, int]:
    """(correct, labelled) of `top1` over the labelled images."""
    correct = labelled = 0
    for im in images:
        if im.labelled and im.id in top1:
            labelled += 1
            correct += top1[im.id] in im.labels
    return correct, labelled
