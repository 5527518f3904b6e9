"""Calibration and test images for verifying engines and calibrating int8.

The calibration set is a small subset of the checkpoint's own training data, stored as uint8 in the
checkpoint's folder: `calibration.safetensors` with
- `images`: uint8 (N, C, R, R), already `store.resize_crop`-ed to the manifest's resolution
  (exactly what an engine receives), C in {1, 3};
- `labels`: int64 (N,), optional.
The trainer writes it with `save_calibration` next to the weights.

A checkpoint without a calibration set (imported weights, older checkpoints) falls back, in order:
1. `dataset == "fashion-mnist"`: a fixed, seeded sample of the training split (`store.fashion_mnist`)
   is generated and cached in the checkpoint's `engines/` folder;
2. `dataset` starting with "imagenet" (ImageNet is not available offline): 256 random crops and
   flips of the photos that ship with scikit-image (coffee, chelsea, rocket, astronaut, ...), a
   stand-in for training data, cached the same way and named as such in every verdict. They serve
   the fp32 and bf16 checks; int8 is refused (`CalibrationSet.int8_problem`);
3. otherwise there is no calibration data: fp32 engines are still verified (logits on a fixed,
   seeded uint8 noise batch: closeness of logits needs no real images), bf16 is verified by top-1
   agreement on that noise batch (weaker, recorded as such), and int8 is refused (static
   quantisation calibrated on noise would set the wrong activation ranges).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from store import Manifest, fashion_mnist as fmnist, resize_crop
from store.durable import intact, sidecar, write_checked

log = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.safetensors"
CALIBRATION_SIZE = 256  # enough for stable int8 ranges; 99% agreement then allows 2 flips
VERIFY_BATCH = 16  # the fixed batch on which fp32 logits are compared


@dataclass
class CalibrationSet:
    images: torch.Tensor  # uint8 (N, C, R, R)
    labels: torch.Tensor | None
    source: str  # where it came from, recorded with every verification

    @property
    def real(self) -> bool:
        return not self.source.startswith("synthetic")

    @property
    def stand_in(self) -> bool:
        """Real images, but not the checkpoint's own data (photo crops for a model trained on ImageNet)."""
        return STAND_IN in self.source

    def int8_problem(self) -> str | None:
        """Why int8 cannot be calibrated on this set, or None.

        Static int8 is calibrated on a stored subset of the checkpoint's own training data. Photo crops
        stand in for ImageNet in the fp32 checks, but lite0 quantised on them agrees with its reference on
        only ~75% of them: always refused, after a minute of quantising, so it is not tried.
        """
        if not self.real:
            return f"int8 needs real calibration images; {self.source}"
        if self.stand_in:
            return (f"int8 is calibrated on the checkpoint's own training data, and this checkpoint has none "
                    f"({self.source}); store some with engines.save_calibration")
        return None


def save_calibration(
    tag_or_folder: str | Path, images: torch.Tensor, labels: torch.Tensor | None = None, home: str | None = None
) -> Path:
    """Write a calibration set into a checkpoint (tag or folder); the trainer calls this after saving.

    `images` must already be at the checkpoint's resolution (`store.resize_crop`), uint8.
    """
    from store import read_manifest

    manifest, folder = read_manifest(tag_or_folder, home)
    if images.shape[-1] != manifest.resolution or images.shape[-2] != manifest.resolution:
        raise ValueError(f"calibration images are {tuple(images.shape[-2:])}, the checkpoint's resolution is "
                         f"{manifest.resolution}: resize_crop them first")

    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"calibration images must be uint8 (N, C, R, R), got {images.dtype} {tuple(images.shape)}")
    tensors = {"images": images.contiguous()}
    if labels is not None:
        tensors["labels"] = labels.to(torch.int64).contiguous()
    path = Path(folder) / CALIBRATION_FILE
    _write(path, tensors, "training data subset")
    return path


def _write(path: Path, tensors: dict[str, torch.Tensor], source: str) -> None:
    """A calibration file, whole or not at all (a temporary file renamed), with its size and sha256 beside it."""
    from safetensors.torch import save

    write_checked(path, save(tensors, metadata={"source": source}))


def _read(path: Path) -> tuple[dict[str, torch.Tensor], str | None] | None:
    """A calibration file's tensors and recorded source, or None (logged) when it is truncated or damaged:
    it is then generated again rather than read by every later start."""
    from safetensors import safe_open

    if sidecar(path).exists() and not intact(path):
        log.warning("%s does not match its recorded size and sha256 (truncated?); not using it", path)
        return None
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {}).get("source")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a cut file
        log.warning("%s cannot be read (%s: %s); not using it", path, type(e).__name__, e)
        return None


def fashion_mnist(split: str, manifest: Manifest, limit: int | None = None, seed: int = 0) -> CalibrationSet | None:
    """Fashion-MNIST images at the manifest's resolution (None when the dataset is not installed).

    28x28 becomes RxR through `store.resize_crop`, the project's one image->input definition, so the
    engines are checked on exactly what the service feeds them.
    """
    if not all(p.is_file() for p in fmnist.files(split)):
        return None
    images, labels = fmnist.load(split)
    if limit is not None and limit < len(images):
        idx = torch.from_numpy(np.sort(np.random.default_rng(seed).choice(len(images), limit, replace=False)))
        images, labels = images[idx], labels[idx]
    x = resize_crop(images.unsqueeze(1), manifest)
    return CalibrationSet(x.contiguous(), labels, _fashion_source(split))


STAND_IN = "scikit-image photos"  # in the source of a stand-in calibration set (see CalibrationSet.stand_in)
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "colorwheel", "stereo_motorcycle", "cat", "camera", "clock", "coins", "moon")


def photo_crops(manifest: Manifest, n: int, seed: int = 0) -> CalibrationSet | None:
    """`n` seeded random crops (25-100% of the area) and flips of scikit-image's photos, resize_crop-ed."""
    try:
        import skimage.data
    except ImportError:
        return None
    photos = []
    for name in PHOTOS:
        im = getattr(skimage.data, name)()
        im = im[0] if isinstance(im, tuple) else im
        t = torch.from_numpy(np.ascontiguousarray(im))
        photos.append(t.permute(2, 0, 1)[:3] if t.dim() == 3 else t.unsqueeze(0).expand(3, -1, -1))
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        im = photos[i % len(photos)]
        h, w = im.shape[-2:]
        scale = 0.25 + 0.75 * torch.rand(1, generator=g).item()
        ch, cw = max(16, int(h * scale ** 0.5)), max(16, int(w * scale ** 0.5))
        y = int(torch.randint(0, h - ch + 1, (1,), generator=g))
        x = int(torch.randint(0, w - cw + 1, (1,), generator=g))
        crop = im[:, y:y + ch, x:x + cw]
        if torch.rand(1, generator=g).item() < 0.5:
            crop = crop.flip(-1)
        out.append(resize_crop(crop.contiguous(), manifest)[0])
    source = (f"generated: {n} random crops of {len(photos)} {STAND_IN} (dataset "
              f"{manifest.dataset!r} is not available offline)")
    return CalibrationSet(torch.stack(out), None, source)


def synthetic_batch(manifest: Manifest, n: int = VERIFY_BATCH, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, manifest.resolution, manifest.resolution), dtype=torch.uint8, generator=g)


def load_calibration(folder: Path, manifest: Manifest, cache: Path | None = None) -> CalibrationSet:
    """The checkpoint's calibration set, else the documented fallback (see the module docstring)."""
    for path in (folder / CALIBRATION_FILE, cache / CALIBRATION_FILE if cache else None):
        if path is not None and path.is_file() and (got := _read(path)) is not None:
            t, recorded = got
            source = f"checkpoint calibration set ({CALIBRATION_FILE}, {len(t['images'])} images)"
            if path.parent != folder:  # generated earlier: the same words as when it was made
                source = recorded or "generated calibration set"
            return CalibrationSet(t["images"], t.get("labels"), source)
    if _is_fashion(manifest):
        calib = fashion_mnist("train", manifest, limit=CALIBRATION_SIZE)
        if calib is not None:
            log.info("%s: no %s; generated %d images from the %s", folder.name, CALIBRATION_FILE,
                     len(calib.images), calib.source)
            calib.source = f"generated from the {calib.source} (checkpoint has no {CALIBRATION_FILE})"
            _cache(cache, {"images": calib.images, "labels": calib.labels}, calib.source)
            return calib
    if manifest.dataset.lower().startswith("imagenet"):
        calib = photo_crops(manifest, CALIBRATION_SIZE)
        if calib is not None:
            _cache(cache, {"images": calib.images}, calib.source)
            return calib
    return CalibrationSet(synthetic_batch(manifest, CALIBRATION_SIZE), None,
                          f"synthetic uint8 noise (checkpoint has no {CALIBRATION_FILE} and dataset "
                          f"{manifest.dataset!r} is not available offline)")


def _cache(cache: Path | None, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Keep a generated set for the next start; one that cannot be written (a read-only folder) is only
    generated again then."""
    if cache is None:
        return
    try:
        _write(cache / CALIBRATION_FILE, tensors, source)
    except OSError as e:
        log.warning("cannot cache the generated calibration set in %s: %s", cache, e)


def _is_fashion(manifest: Manifest) -> bool:
    return manifest.dataset.lower().replace("_", "-") == "fashion-mnist"


def _fashion_source(split: str) -> str:
    return f"fashion-mnist {split} split"


def test_set_source(manifest: Manifest) -> str | None:
    """The `source` of `load_test_set(manifest)`, without reading an image (None where it would be None)."""
    if _is_fashion(manifest) and all(p.is_file() for p in fmnist.files("test")):
        return _fashion_source("test")
    return None


def load_test_set(manifest: Manifest) -> CalibrationSet | None:
    """The checkpoint's test set where it is available offline (Fashion-MNIST), else None."""
    if _is_fashion(manifest):
        return fashion_mnist("test", manifest)
    return None
