"""Labelled image sets that the load test sends, encoded once and held in memory.

- `fashion-mnist`: the first N images of the Fashion-MNIST test set (Debian package
  `dataset-fashion-mnist`, idx files), each encoded as an 8-bit grayscale PNG. PNG is lossless, so
  the service decodes exactly the pixels the offline evaluation uses.
- `photos`: real photographs that ship with scikit-image, sent as their original files (PNG or JPEG,
  300x300 to 741x500), with the ImageNet classes a person would accept as their true label. Photos
  with no ImageNet class (the astronaut) are sent too, as load, but count toward no accuracy.
- `bad_inputs`: what a careless client sends (garbage bytes, a truncated file): the service must
  answer 4xx.

Every image has a stable id (`fashion-mnist/17`, `photos/coffee`) so the responses that the users
record can be matched with the offline evaluation of the very same bytes.
"""
from __future__ import annotations

import io
import os
import random
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

# scikit-image photo -> the ImageNet-1k classes (index, name) a person accepts as its true label.
# ImageNet-1k has several near-identical cat classes and no plain "motorcycle": every defensible
# class is accepted rather than one picked arbitrarily. Labels are judged from the
# picture, not from any model's answer (Lite0 gets `clock_motion` wrong, and that is counted).
# Indices are written out so Locust users need not import torchvision; a test checks the names.
PHOTO_LABELS: dict[str, tuple[tuple[int, str], ...]] = {
    "coffee.png": ((967, "espresso"),),
    "chelsea.png": ((281, "tabby"), (282, "tiger cat"), (285, "Egyptian cat")),
    "rocket.jpg": ((657, "missile"), (744, "projectile"), (812, "space shuttle")),
    "motorcycle_left.png": ((665, "moped"), (670, "motor scooter")),
    "motorcycle_right.png": ((665, "moped"), (670, "motor scooter")),
    "camera.png": ((872, "tripod"), (759, "reflex camera")),
    "clock_motion.png": ((409, "analog clock"), (892, "wall clock")),
    "astronaut.png": (),  # no ImageNet class: load only
}

DATASETS = ("fashion-mnist", "photos")


@dataclass(frozen=True)
class LabelledImage:
    id: str  # stable across runs: "<set>/<name or index>"
    data: bytes  # the encoded file, exactly as sent
    filename: str
    content_type: str
    labels: frozenset[int] = field(default_factory=frozenset)  # accepted true class indices; empty: unlabelled

    @property
    def labelled(self) -> bool:
        return bool(self.labels)


# A folder where encoded image sets are kept for the other processes of one run: each Locust step is a
# process of its own, and encoding the 10,000 test images costs each about 3 s.
CACHE_ENV = "EFFNET_IMAGE_CACHE"


def _save(path: Path, images: tuple[LabelledImage, ...]) -> None:
    """`images` as plain arrays (no pickle): the bytes end to end with their offsets, names, labels."""
    import numpy as np

    ends = np.cumsum([len(x.data) for x in images])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, data=np.frombuffer(b"".join(x.data for x in images), np.uint8), ends=ends,
             ids=np.array([x.id for x in images]), filenames=np.array([x.filename for x in images]),
             types=np.array([x.content_type for x in images]), labels=np.array([min(x.labels, default=-1)
                                                                               for x in images]))
    os.replace(tmp, path)  # whole or absent for a reader in another process


def _load(path: Path) -> tuple[LabelledImage, ...]:
    import numpy as np

    with np.load(path) as z:
        data, ends = z["data"].tobytes(), z["ends"].tolist()
        starts = [0, *ends[:-1]]
        return tuple(LabelledImage(str(i), data[a:b], str(f), str(t), frozenset({int(y)} if y >= 0 else ()))
                     for i, a, b, f, t, y in zip(z["ids"], starts, ends, z["filenames"], z["types"], z["labels"]))


@lru_cache(maxsize=4)
def fashion_mnist(n: int = 200, root: str | Path | None = None) -> tuple[LabelledImage, ...]:
    """The first `n` Fashion-MNIST test images as PNG files, with their labels (`root`: the dataset's
    folder, default `store.fashion_mnist.data_dir()`); read from `$EFFNET_IMAGE_CACHE` where an earlier
    process of the run left them."""
    cache = os.environ.get(CACHE_ENV)
    path = Path(cache) / f"fashion-mnist-{n}.npz" if cache and root is None else None
    if path is not None and path.exists():
        return _load(path)
    images = _encode_fashion_mnist(n, root)
    if path is not None:
        _save(path, images)
    return images


def _encode_fashion_mnist(n: int, root: str | Path | None) -> tuple[LabelledImage, ...]:
    from PIL import Image

    # Imported here: the store brings torch, which a Locust process needs only for this one read.
    from store import fashion_mnist as dataset

    images, labels = dataset.load("test", folder=root)
    out = []
    for i in range(min(n, len(images))):
        buf = io.BytesIO()
        Image.fromarray(images[i].numpy()).save(buf, format="PNG")
        out.append(LabelledImage(f"fashion-mnist/{i}", buf.getvalue(), f"fmnist-{i}.png", "image/png",
                                 frozenset({int(labels[i])})))
    return tuple(out)


@lru_cache(maxsize=1)
def photos() -> tuple[LabelledImage, ...]:
    """The scikit-image photos of `PHOTO_LABELS`, as their original files."""
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    out = []
    for fname, accepted in PHOTO_LABELS.items():
        data = (folder / fname).read_bytes()
        ctype = "image/jpeg" if fname.endswith(".jpg") else "image/png"
        out.append(LabelledImage(f"photos/{fname.rsplit('.', 1)[0]}", data, fname, ctype,
                                 frozenset(i for i, _ in accepted)))
    return tuple(out)


def square_jpeg(img, side: int = 224, quality: int = 90) -> bytes:
    """A PIL image centre-cropped to a square, resized to `side` and encoded as a JPEG: how the serving
    benchmarks send photos at the model's own size, so that inference rather than decoding is measured."""
    from PIL import Image

    img = img.convert("RGB")
    s = min(img.size)
    img = img.crop(((img.width - s) // 2, (img.height - s) // 2, (img.width + s) // 2, (img.height + s) // 2))
    buf = io.BytesIO()
    img.resize((side, side), Image.BILINEAR).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


# The photos the serving benchmark sends: a spread of content and JPEG sizes, labelled or not.
BENCH_PHOTOS = ("chelsea", "coffee", "rocket", "astronaut", "hubble_deep_field", "immunohistochemistry")


def square_photos(side: int = 224) -> list[bytes]:
    """scikit-image's `BENCH_PHOTOS` as `side` x `side` JPEGs (`square_jpeg`)."""
    from PIL import Image
    from skimage import data

    return [square_jpeg(Image.fromarray(getattr(data, name)()), side) for name in BENCH_PHOTOS]


def image_set(name: str, n: int = 200) -> tuple[LabelledImage, ...]:
    if name == "fashion-mnist":
        return fashion_mnist(n)
    if name == "photos":
        return photos()
    raise ValueError(f"unknown image set {name!r}; known: {', '.join(DATASETS)}")


def dataset_for(dataset: str | None, num_classes: int | None = None, route: str | None = None) -> str:
    """Which image set fits a variant: by its manifest's dataset, else its class count, else its route."""
    text = f"{dataset or ''} {route or ''}".lower()
    if "fashion" in text or num_classes == 10:
        return "fashion-mnist"
    if "imagenet" in text or num_classes == 1000:
        return "photos"
    raise ValueError(f"no labelled image set for dataset={dataset!r} classes={num_classes} route={route!r}")


# Bad inputs: each kind must be answered 4xx. Built from a real image so "truncated" is realistic.
BAD_KINDS = ("garbage", "truncated")


def bad_input(kind: str, rng: random.Random, good: LabelledImage) -> tuple[bytes, str, str]:
    """(bytes, filename, content type) of a broken upload of `kind`."""
    if kind == "garbage":
        return rng.randbytes(rng.randint(16, 2048)), "garbage.png", "image/png"
    if kind == "truncated":
        return good.data[: max(8, len(good.data) // 2)], "truncated-" + good.filename, good.content_type
    raise ValueError(f"unknown bad input kind {kind!r}; known: {', '.join(BAD_KINDS)}")
