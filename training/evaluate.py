"""Checking a stored checkpoint before serving it: `effnet evaluate` and `effnet predict`.

`evaluate_checkpoint` measures a checkpoint on a labelled split, loaded by `training.data.load_data` at
the manifest's resolution and run through the manifest's own preprocessing (`store.InputNormalizer`), with
the trainer's own `training.loop.evaluate`: on the data it was trained on it gives the manifest's figures
again. `--split val` is the very validation split the trainer held out (the manifest's `val_images` and
`val_seed`), so the figures that chose the weights can be checked too.

`Predictor` answers image files as the service does: `store.images.decode_image` with the service's pixel
limit and the variant's `min_side` (service/decode.py), `store.resize_crop`, the checkpoint's engine, and
softmax(logits / temperature) (service/workers.py), so an offline answer equals a served one.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

SPLITS = ("test", "val")
# The files a folder given to `effnet predict` contributes: the image formats the service decodes, by
# extension (a file named explicitly is always tried, whatever its name).
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif"}


def _split_config(manifest, data: str, split: str, limit: int):
    """The TrainConfig that makes `load_data` give `split` of `data` as the checkpoint's trainer did."""
    from .config import resolve_config

    m, t = manifest.metrics or {}, manifest.training or {}
    values: dict[str, Any] = {
        "variant": manifest.variant, "data": data, "resolution": manifest.resolution, "auto_augment": "none",
        # Only the evaluated split is read: one training image keeps load_data from resizing the other 60,000
        # (an image folder's train/ is only listed, and it must keep two classes to pass load_data's checks).
        "limit_train": 0 if data.startswith("imagefolder:") else 1, "limit_test": limit, "seed": t.get("seed", 0),
        "val_size": 0,
    }
    if split == "val":
        if not m.get("val_images"):
            raise ValueError(f"checkpoint {manifest.variant!r} ({manifest.dataset}) records no validation split "
                             "(trained before there was one, or with --val-size 0): use --split test")
        if t.get("data") and t["data"] != data:
            raise ValueError(f"--split val is the validation split held out of the data the checkpoint was trained on, "
                             f"{t['data']}; --data {data} has a different one: use --data {t['data']} or --split test")
        # the count, not the training's --val-size, so an automatic size draws exactly the same images
        values.update(val_size=m["val_images"] if m.get("val_from") == "train" else t.get("val_size", -1),
                      val_seed=m.get("val_seed") or 0)
    return resolve_config(values)


def load_split(manifest, data: str, split: str = "test", limit: int = 0):
    """The labelled `split` ("test" or "val") of `data` for `manifest`: (dataset, class names)."""
    from store import resize_crop

    from .data import load_data

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use test or val")
    spec = load_data(_split_config(manifest, data, split, limit))
    dataset = spec.val if split == "val" else spec.test
    if dataset is None:
        raise ValueError(f"--data {data} has no validation split for this checkpoint: use --split test")
    if list(spec.classes) != list(manifest.classes):
        raise ValueError(f"--data {data} has the classes {_short(spec.classes)}, the checkpoint "
                         f"{_short(manifest.classes)}: evaluate it on the data it classifies")
    if hasattr(dataset, "samples"):  # an image folder: the checkpoint's own resize, not load_data's default
        dataset.transform = lambda x: resize_crop(x, manifest)[0]
    return dataset, spec.classes


def _short(names: list[str], n: int = 6) -> str:
    return f"{len(names)} [{', '.join(names[:n])}{', ...' if len(names) > n else ''}]"


def _bar(batches: Iterable, total: int, show: bool) -> Iterable:
    if not show:
        return batches
    from engines.progress import progress

    return progress(batches, "evaluating", total=total, unit="batch")


def evaluate_checkpoint(tag: str, data: str, split: str = "test", *, home: str | None = None, limit: int = 0,
                        batch_size: int = 256, show_progress: bool = False) -> dict[str, Any]:
    """Top-1, top-5, per-class accuracy, the confusion matrix and the expected calibration error (with
    temperature 1 and with the manifest's) of checkpoint `tag` on `split` of `data`."""
    from torch.utils.data import DataLoader

    from store import InputNormalizer, load_checkpoint

    from .loop import evaluate
    from .temperature import expected_calibration_error

    model, manifest = load_checkpoint(tag, home=home)
    dataset, classes = load_split(manifest, data, split, limit)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    channels_last = bool((manifest.training or {}).get("channels_last", True))
    out = evaluate(model, _bar(loader, len(loader), show_progress), InputNormalizer(manifest), manifest.num_classes,
                   torch.device("cpu"), channels_last, keep_logits=True)
    logits, labels = out.pop("logits"), out.pop("labels")
    t = float(manifest.temperature or 1.0)
    m = manifest.metrics or {}
    return {
        "tag": tag, "variant": manifest.variant, "data": data, "split": split, "images": out["images"],
        "top1": out["top1"], "top5": out["top5"], "loss": out["loss"],
        "per_class": dict(zip(classes, out["per_class"])), "confusion": out["confusion"],
        "temperature": t,
        "ece": expected_calibration_error(torch.softmax(logits.double(), 1), labels),
        "ece_with_temperature": expected_calibration_error(torch.softmax(logits.double() / t, 1), labels),
        # what the trainer recorded for the same split, to compare with
        "manifest_top1": m.get("val_top1") if split == "val" else m.get("top1"),
        "manifest_images": m.get("val_images") if split == "val" else m.get("test_images"),
    }


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders as the image files under them (by extension, sorted); a path that does not
    exist stays in the list, to be answered with its error."""
    from .data import image_files

    out: list[Path] = []
    for p in map(Path, paths):
        out += image_files(p, IMAGE_EXTS) if p.is_dir() else [p]
    return out


@dataclass
class Answer:
    """One file's answer: its top-k (index, label, score), or the reason it has none."""

    file: str
    predictions: list[dict[str, Any]] | None = None
    error: str | None = None


class Predictor:
    """A checkpoint answering image files with the service's decoder, preprocessing and score temperature."""

    def __init__(self, tag: str, *, home: str | None = None, max_pixels: int, engine: str = "torch",
                 threads: int | None = None) -> None:
        from engines import load_engine

        self.engine, self.manifest = load_engine(tag, engine=engine, threads=threads, home=home, batch_sizes=(1,))
        self.max_pixels = max_pixels

    def scores(self, data: bytes) -> torch.Tensor:
        """Encoded image -> calibrated class probabilities (num_classes,); raises store.images.ImageError."""
        from store import resize_crop
        from store.images import decode_image

        m = self.manifest
        rgb = decode_image(data, max_pixels=self.max_pixels, min_side=m.resize or m.resolution)
        with torch.no_grad():
            logits = self.engine(resize_crop(torch.from_numpy(rgb), m))
        return torch.softmax(torch.as_tensor(logits).float() / m.temperature, dim=1)[0]

    def answer(self, path: Path, top_k: int) -> Answer:
        from store.images import ImageError

        try:
            data = path.read_bytes()
        except OSError as e:
            return Answer(str(path), error=f"cannot read the file: {e.strerror or e}")
        try:
            probs = self.scores(data)
        except ImageError as e:
            return Answer(str(path), error=str(e))
        scores = probs.numpy()
        # the gateway's order: highest first, a tie to the lower index
        top = np.argsort(-scores, kind="stable")[:top_k]
        # the gateway's fields, rounded as it rounds them
        return Answer(str(path), [{"label": self.manifest.classes[i], "index": int(i),
                                   "score": round(float(scores[i]), 6)} for i in top])
