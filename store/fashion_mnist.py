"""Fashion-MNIST: its classes, its pixel statistics, where its files are, and the one IDX reader.

The files are the four IDX files of the Debian package `dataset-fashion-mnist`
(`/usr/share/datasets/fashion-mnist`), or wherever `$FASHION_MNIST_DIR` points. Debian ships them
gzipped (`train-images-idx3-ubyte.gz`); unpacked copies (`train-images-idx3-ubyte`, as torchvision
leaves beside its download) are read the same way. `load` returns torch tensors.
"""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import torch

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# Per-channel statistics of the training split on 0..1 pixels (one channel: the images are gray).
MEAN, STD = [0.2860], [0.3530]

ENV_VAR = "FASHION_MNIST_DIR"
DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
SPLITS = {"train": "train", "test": "t10k"}  # split -> file prefix


def data_dir() -> Path:
    """`$FASHION_MNIST_DIR` when set (and not empty), else the Debian package's folder."""
    return Path(os.environ.get(ENV_VAR) or DEFAULT_DIR).expanduser()


def _file(folder: Path, name: str) -> Path:
    """`folder/name.gz`, else `folder/name` where only the unpacked file is there."""
    gz = folder / f"{name}.gz"
    return folder / name if not gz.is_file() and (folder / name).is_file() else gz


def files(split: str, folder: str | Path | None = None) -> tuple[Path, Path]:
    """(images, labels) IDX files of `split` ("train" or "test") in `folder` (default `data_dir()`)."""
    if split not in SPLITS:
        raise ValueError(f"Fashion-MNIST has the splits {', '.join(SPLITS)}, not {split!r}")
    folder = Path(folder) if folder is not None else data_dir()
    prefix = SPLITS[split]
    return _file(folder, f"{prefix}-images-idx3-ubyte"), _file(folder, f"{prefix}-labels-idx1-ubyte")


def available(folder: str | Path | None = None) -> bool:
    """Whether all four files are in `folder` (default `data_dir()`)."""
    return all(p.is_file() for split in SPLITS for p in files(split, folder))


def read_idx(path: str | Path) -> torch.Tensor:
    """An IDX file of unsigned bytes, plain or gzipped (told by its first bytes), as a uint8 tensor."""
    path = Path(path)
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4:
        raise ValueError(f"{path}: not an IDX file (only {len(data)} bytes)")
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    payload = data[4 + 4 * ndim :]
    if len(payload) != (n := torch.Size(shape).numel()):
        raise ValueError(f"{path}: the header promises {n} bytes of {shape}, the file holds {len(payload)}")
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8).reshape(shape)


def load(split: str, folder: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of `split`, "train" (60,000) or "test" (10,000).

    FileNotFoundError naming the folder, `$FASHION_MNIST_DIR` and the Debian package when a file is missing.
    """
    images_file, labels_file = files(split, folder)
    missing = [p.name for p in (images_file, labels_file) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST's {split} split is not in {images_file.parent} (missing {', '.join(missing)}): install "
            f"the Debian package ({'sudo apt-get install ' + DEBIAN_PACKAGE}) or set ${ENV_VAR} to a folder that "
            "holds the IDX files")
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
        raise ValueError(f"{images_file.parent}: {tuple(images.shape)} images and {tuple(labels.shape)} labels "
                         "are not a Fashion-MNIST split")
    return images, labels.long()
