"""Datasets: `fashion-mnist`, `imagefolder:PATH`, `fake`; all yield uint8 images.

The network never sees a float image prepared here: training, evaluation and the service all turn
uint8 images into model input with `store.resize_crop` + `store.InputNormalizer`, read from the same
manifest fields, so an image gets the same logits offline and under load.

Grayscale (Fashion-MNIST) is trained with **1 input channel**: the data has one, the stem is 3x
cheaper, and `store.InputNormalizer` turns any RGB photo sent to the service into luma
(PIL's convert("L") weights) before the network, so users never convert anything.

Validation: every choice a run makes (EMA or model weights) is made on a validation split held out
from the training images, stratified by class and drawn with `val_seed` (apart from `seed`, so runs of
every variant and seed choose on the same images); the test split is evaluated once, at the end, and is
what the manifest's top-1 reports. An image folder with a test/ folder uses val/ for validation.

Small datasets (Fashion-MNIST, fake) are resized once, up front, to the training resolution with the
service's `resize_crop` and kept as one uint8 tensor (60k x 1 x 40 x 40 = 96 MB): decoding and
resizing cost nothing per epoch, and augmentation works on tensors.
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from store import Manifest, fashion_mnist, resize_crop

log = logging.getLogger("effnet.data")

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
FAKE_CLASSES = ["a", "b", "c", "d"]


@dataclass
class DataSpec:
    """What the manifest needs to know about the data, and the two splits."""

    dataset: str  # short name: the `dataset` label and the suffix of the default checkpoint name
    classes: list[str]
    in_chans: int
    grayscale: bool
    mean: list[float]
    std: list[float]
    resize: int  # shorter side before the centre crop (store.resize_crop)
    train: Dataset
    test: Dataset  # evaluated once, at the end: Fashion-MNIST's test split, an imagefolder's test/ or else val/
    val: Dataset | None = None  # every choice is made on it; None: val_size 0, the choices fall to `test`
    split: dict = field(default_factory=dict)  # how `val` was made, for the manifest (val_images, val_seed, val_from)


class TensorImages(Dataset):
    """uint8 (N,C,R,R) images already at the training resolution, with an optional per-image transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.images[i]
        return (self.transform(x) if self.transform else x), int(self.labels[i])


# Folders and files that tools put beside the data, never classes or images: Jupyter's
# .ipynb_checkpoints, Synology's @eaDir thumbnails, macOS's __MACOSX and ._ AppleDouble files.
def is_hidden(name: str) -> bool:
    return name.startswith((".", "@")) or name == "__MACOSX"


def class_folders(split: Path) -> list[str]:
    return sorted(p.name for p in split.iterdir() if p.is_dir() and not is_hidden(p.name))


def image_files(folder: Path, exts) -> list[Path]:
    """The image files under `folder`, sorted; symlinked folders are followed, each real folder once.

    os.walk, not rglob: rglob skips a symlinked sub-folder without a word, and a dataset assembled
    from links lost those images. The set of real paths stops a link that points back up.
    """
    files, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not is_hidden(d)]
        files += [Path(dirpath) / f for f in filenames if not is_hidden(f) and Path(f).suffix.lower() in exts]
    return sorted(files)


class ImageFiles(Dataset):
    """An ImageFolder split (`class/xxx.jpg`), decoded to uint8 RGB tensors by the service's decoder."""

    EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif"}
    # PIL's own refusal limit (twice its decompression-bomb warning); the service's is lower, for requests.
    MAX_PIXELS = 2 * 89_478_485

    def __init__(self, root: Path, classes: list[str], transform) -> None:
        self.samples = [(p, i) for i, c in enumerate(classes) if (root / c).is_dir()
                        for p in image_files(root / c, self.EXTS)]
        if not self.samples:
            raise FileNotFoundError(f"no images under {root}")
        self.transform = transform
        self.bad: set[Path] = set()

    def __len__(self) -> int:
        return len(self.samples)

    # A file that cannot be decoded is replaced by the next one that can, at most this many tries on.
    MAX_SKIPS = 16

    def __getitem__(self, i: int):
        from store.images import decode_image

        # A corrupt file in a large ImageFolder (ImageNet has a few) must not stop a run of hours: it is
        # logged by path once per process and replaced by the next sample, the same one every epoch, so a
        # seeded run stays reproducible. store.images is the service's decoder (BMP, a GIF's first frame,
        # 16-bit PNG scaled to 8 bits), so training sees the pixels the service will.
        for k in range(self.MAX_SKIPS + 1):
            path, label = self.samples[(i + k) % len(self.samples)]
            try:
                x = torch.from_numpy(decode_image(path.read_bytes(), max_pixels=self.MAX_PIXELS))
            except Exception as e:
                if path not in self.bad:
                    self.bad.add(path)
                    log.warning("skipping %s: it cannot be decoded (%s: %s); using the next image instead",
                                path, type(e).__name__, str(e).splitlines()[0][:200])
                continue
            return self.transform(x), label
        raise ValueError(f"{self.MAX_SKIPS + 1} images in a row from {self.samples[i][0]} on cannot be decoded "
                         f"(JPEG, PNG, WebP, BMP and GIF are read): is this the right folder?")


def stratified_subset(samples: list[tuple[Path, int]], n: int, seed: int) -> list[tuple[Path, int]]:
    """`n` of `samples` drawn class by class in turn (each class shuffled with `seed`), in class order.

    The first n files in class order were all of the first class: a `--limit-train 8` run had one class.
    """
    if not n or n >= len(samples):
        return samples
    rng = random.Random(seed)
    by_class: dict[int, list] = {}
    for s in samples:
        by_class.setdefault(s[1], []).append(s)
    for files in by_class.values():
        rng.shuffle(files)
    picked = [files[k] for k in range(max(map(len, by_class.values()))) for _, files in sorted(by_class.items())
              if k < len(files)]
    return sorted(picked[:n], key=lambda s: (s[1], str(s[0])))


# `val_size` -1 (auto), as a fraction of the training images: 5,000 of Fashion-MNIST's 60,000, a tenth of an
# image folder's train/ (one without test/), 16 of the fake data's 96.
AUTO_VAL_SIZE = {"fashion-mnist": 1 / 12, "imagefolder": 0.1, "fake": 1 / 6}


def val_count(val_size: float, n: int, data: str) -> int:
    """Images to hold out of `n` for validation: `val_size` images (>= 1), a fraction of n (< 1), 0, or auto (-1)."""
    size = AUTO_VAL_SIZE[data] if val_size < 0 else val_size
    count = int(round(size * n)) if size < 1 else int(size)
    if count and count >= n - 1:
        raise ValueError(f"--val-size {val_size:g} holds out {count} of {n} training images and leaves too few to "
                         "train on: give a smaller count or fraction (0: no validation split)")
    return count


def stratified_split(labels: list[int], n_val: int, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, validation indices) of `labels`: `n_val` of them held out class by class in proportion to
    each class's share (largest remainders), each class shuffled with `seed`. Both lists are sorted; the same
    labels and seed always give the same split."""
    if n_val <= 0:
        return list(range(len(labels))), []
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    exact = {c: n_val * len(idx) / len(labels) for c, idx in by_class.items()}
    quota = {c: int(q) for c, q in exact.items()}
    for c in sorted(exact, key=lambda c: (quota[c] - exact[c], c))[: n_val - sum(quota.values())]:
        quota[c] += 1
    val: list[int] = []
    for c in sorted(by_class):
        idx = by_class[c][:]
        rng.shuffle(idx)
        val += idx[: quota[c]]
    held = set(val)
    return [i for i in range(len(labels)) if i not in held], sorted(val)


def _split_tensors(x: torch.Tensor, y: torch.Tensor, cfg, data: str):
    """(train x, train y, val x, val y, split record) of a training set held as tensors."""
    n_val = val_count(cfg.val_size, len(y), data)
    train_idx, val_idx = stratified_split(y.tolist(), n_val, cfg.val_seed)
    t, v = torch.tensor(train_idx, dtype=torch.long), torch.tensor(val_idx, dtype=torch.long)
    return x[t], y[t], x[v], y[v], {"val_images": n_val, "val_seed": cfg.val_seed, "val_from": "train"}


def fashion_mnist_folder() -> Path:
    """The folder of the Fashion-MNIST files: `store.fashion_mnist.data_dir()`, else torchvision's download.

    The download is for users without the Debian package; offline it fails with an error that says
    where the files were looked for.
    """
    folder = fashion_mnist.data_dir()
    if fashion_mnist.available(folder):
        return folder
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "effnet" / "fashion-mnist"
    raw = cache / "FashionMNIST" / "raw"
    if not fashion_mnist.available(raw):
        try:
            from torchvision.datasets import FashionMNIST

            FashionMNIST(str(cache), train=True, download=True)
            FashionMNIST(str(cache), train=False, download=True)
        except Exception as e:
            raise FileNotFoundError(
                f"Fashion-MNIST not found in {folder} (Debian: apt-get install {fashion_mnist.DEBIAN_PACKAGE}, "
                f"or set {fashion_mnist.ENV_VAR}) and the download failed: {e}"
            ) from None
    return raw


def _pre_resize(images: torch.Tensor, manifest: Manifest, chunk: int = 4096) -> torch.Tensor:
    # The service's resize_crop, in chunks to bound memory; contiguous channels_last-free uint8.
    return torch.cat([resize_crop(images[i : i + chunk], manifest) for i in range(0, len(images), chunk)])


def _limit(x: torch.Tensor, y: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (x[:n], y[:n]) if n else (x, y)


def auto_augment_transform(name: str, magnitude: int):
    """torchvision's policy on uint8 tensors, or None."""
    from torchvision.transforms import v2 as T

    if name == "randaugment":
        return T.RandAugment(num_ops=2, magnitude=magnitude)
    if name == "autoaugment":
        return T.AutoAugment(T.AutoAugmentPolicy.IMAGENET)
    if name == "trivialaugment":
        return T.TrivialAugmentWide()
    return None


def check_classes(root: Path, classes: list[str], train: ImageFiles, test: ImageFiles) -> None:
    """Refuse fewer than 2 trainable classes; warn, naming them, about classes one split lacks."""
    n_train = [0] * len(classes)
    n_test = [0] * len(classes)
    for _, label in train.samples:
        n_train[label] += 1
    for _, label in test.samples:
        n_test[label] += 1
    trainable = [c for c, n in zip(classes, n_train) if n]
    if len(trainable) < 2:
        raise ValueError(f"{root / 'train'} holds images of {len(trainable)} class(es) {trainable}: a classifier "
                         "needs at least 2 class folders with images (train/CLASS/*.jpg)")
    val_only = sorted(set(class_folders(root / "val")) - set(classes))
    if val_only:
        log.warning("val/ has classes that train/ lacks, ignored: %s", val_only)
    empty = [c for c, n in zip(classes, n_train) if not n]
    if empty:
        log.warning("train/ has classes without images (the model learns nothing for them): %s", empty)
    unmeasured = [c for c, n in zip(classes, n_test) if not n]
    if unmeasured:
        log.warning("classes without test images in val/ (their per-class accuracy is null): %s", unmeasured)


def load_data(cfg) -> DataSpec:
    """The train and test splits of `cfg.data` at `cfg.resolution`, plus what the manifest records about them."""
    r = cfg.resolution
    augment = auto_augment_transform(cfg.auto_augment, cfg.randaugment_magnitude)
    if cfg.data == "fashion-mnist":
        folder = fashion_mnist_folder()
        # 28 -> r: resize the shorter side to r and centre-crop r, i.e. a plain resize, as the service does.
        man = Manifest(variant="", config={}, num_classes=10, classes=[], dataset="", resolution=r, in_chans=1, resize=r)
        tx, ty = fashion_mnist.load("train", folder)
        sx, sy = fashion_mnist.load("test", folder)
        tx, ty, vx, vy, split = _split_tensors(tx.unsqueeze(1), ty, cfg, "fashion-mnist")
        tx, ty = _limit(tx, ty, cfg.limit_train)
        vx, vy = _limit(vx, vy, cfg.limit_test)
        sx, sy = _limit(sx.unsqueeze(1), sy, cfg.limit_test)
        return DataSpec(
            "fashion-mnist", list(fashion_mnist.CLASSES), 1, True, list(fashion_mnist.MEAN), list(fashion_mnist.STD), r,
            TensorImages(_pre_resize(tx, man), ty, augment), TensorImages(_pre_resize(sx, man), sy),
            TensorImages(_pre_resize(vx, man), vy) if len(vy) else None, split,
        )
    if cfg.data == "fake":
        # Learnable but tiny: each class is a brightness level plus noise, RGB, 24x24 native.
        g = torch.Generator().manual_seed(1234)

        def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            y = torch.arange(n) % len(FAKE_CLASSES)
            base = (y.float() * 60 + 30).view(n, 1, 1, 1)
            x = (base + torch.randn(n, 3, 24, 24, generator=g) * 20).clamp(0, 255).to(torch.uint8)
            return x, y

        man = Manifest(variant="", config={}, num_classes=4, classes=[], dataset="", resolution=r, in_chans=3, resize=r)
        tx, ty, vx, vy, held = _split_tensors(*split(96), cfg, "fake")
        tx, ty = _limit(tx, ty, cfg.limit_train)
        vx, vy = _limit(vx, vy, cfg.limit_test)
        sx, sy = _limit(*split(32), cfg.limit_test)
        return DataSpec(
            "fake", list(FAKE_CLASSES), 3, False, IMAGENET_MEAN, IMAGENET_STD, r,
            TensorImages(_pre_resize(tx, man), ty, augment), TensorImages(_pre_resize(sx, man), sy),
            TensorImages(_pre_resize(vx, man), vy) if len(vy) else None, held,
        )
    if cfg.data.startswith("imagefolder:"):
        from torchvision.transforms import v2 as T

        given = cfg.data.split(":", 1)[1]
        if not given.strip():
            raise ValueError("--data imagefolder: has an empty path: give the folder that holds train/ and val/, "
                             "e.g. imagefolder:/data/flowers")
        root = Path(given).expanduser()
        if not (root / "train").is_dir() or not (root / "val").is_dir():
            raise FileNotFoundError(f"{root} must hold train/ and val/ folders of class subfolders (ImageNet layout)")
        classes = class_folders(root / "train")
        resize = int(round(r / 0.875))  # the standard 0.875 centre crop of ImageNet evaluation
        man = Manifest(variant="", config={}, num_classes=len(classes), classes=[], dataset="", resolution=r, resize=resize)
        train_tf = T.Compose([T.RandomResizedCrop(r, antialias=True), *([augment] if augment else [])])
        def evaluation(folder: str) -> ImageFiles:
            files = ImageFiles(root / folder, classes, lambda x: resize_crop(x, man)[0])
            files.samples = stratified_subset(files.samples, cfg.limit_test, cfg.seed)
            return files

        train = ImageFiles(root / "train", classes, train_tf)
        if (root / "test").is_dir():  # train/ val/ test/: the folders are the splits
            test, val = evaluation("test"), evaluation("val") if cfg.val_size else None
            split = {"val_images": len(val.samples) if val else 0, "val_seed": None, "val_from": "val/"}
        else:  # train/ val/: val/ is the test split, validation is held out of train/
            test = evaluation("val")
            n_val = val_count(cfg.val_size, len(train.samples), "imagefolder")
            keep, held = stratified_split([y for _, y in train.samples], n_val, cfg.val_seed)
            val = ImageFiles(root / "train", classes, test.transform) if held else None
            if val:
                val.samples = stratified_subset([train.samples[i] for i in held], cfg.limit_test, cfg.seed)
            train.samples = [train.samples[i] for i in keep]
            split = {"val_images": n_val, "val_seed": cfg.val_seed, "val_from": "train"}
        train.samples = stratified_subset(train.samples, cfg.limit_train, cfg.seed)
        check_classes(root, classes, train, test)
        return DataSpec(root.name.lower() or "imagefolder", classes, 3, False, IMAGENET_MEAN, IMAGENET_STD, resize,
                        train, test, val, split)
    raise ValueError(f"unknown data {cfg.data!r}: use fashion-mnist, imagefolder:PATH or fake")


def batch_augment(x: torch.Tensor, pad: int, hflip: bool, erase_p: float = 0.0) -> torch.Tensor:
    """Batched random translation (reflect pad + random crop), horizontal flip and random erasing on uint8.

    One gather per batch instead of a Python transform per image: free next to the network. Runs on
    whatever device `x` is on (the CPU after a DataLoader, the GPU with `DeviceBatches`).
    """
    n, c, h, w = x.shape
    dev = x.device
    if pad:
        padded = torch.nn.functional.pad(x.float(), (pad, pad, pad, pad), mode="reflect").to(x.dtype)
        oy = torch.randint(0, 2 * pad + 1, (n,), device=dev)
        ox = torch.randint(0, 2 * pad + 1, (n,), device=dev)
        iy = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
        ix = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :]
        rows, chans = torch.arange(n, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None]
        x = padded[rows, chans, iy, ix]
    if hflip:
        flip = torch.rand(n, device=dev) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if erase_p > 0:
        # One rectangle of 2-20% of the area (aspect 0.3-3.3), filled with noise, on a fraction erase_p of
        # the images; drawn for the whole batch at once, so no per-image loop and no device sync.
        erase = torch.rand(n, device=dev) < erase_p
        area = h * w * torch.empty(n, device=dev).uniform_(0.02, 0.2)
        ratio = torch.empty(n, device=dev).uniform_(0.3, 3.3)
        eh = (area * ratio).sqrt().long().clamp(1, h)
        ew = (area / ratio).sqrt().long().clamp(1, w)
        y0 = (torch.rand(n, device=dev) * (h - eh + 1)).long()
        x0 = (torch.rand(n, device=dev) * (w - ew + 1)).long()
        ys, xs = torch.arange(h, device=dev), torch.arange(w, device=dev)
        in_y = (ys >= y0[:, None]) & (ys < (y0 + eh)[:, None])  # (n, h)
        in_x = (xs >= x0[:, None]) & (xs < (x0 + ew)[:, None])  # (n, w)
        mask = (erase[:, None, None] & in_y[:, :, None] & in_x[:, None, :])[:, None]  # (n, 1, h, w)
        x = torch.where(mask, torch.randint(0, 256, x.shape, dtype=x.dtype, device=dev), x)
    return x.contiguous()


class DeviceBatches:
    """The training split kept on the training device, shuffled and policy-augmented there, batch by batch.

    The DataLoader path runs the augmentation policy per image in CPU worker processes, which leaves a
    GPU mostly idle (benchmarks/gpu/README.md). Small in-memory sets fit the device whole (Fashion-MNIST
    at 64x64: 60k x 1 x 64 x 64 uint8 = 246 MB), so each step only indexes a batch there.

    The order is the DistributedSampler's (seed + epoch, the same permutation on every rank, rank r
    takes every world-th index, the tail dropped), so DDP ranks see disjoint shards.

    The policy (RandAugment's two ops and their signs) is drawn once per chunk of `chunk` images, not per
    image as on the DataLoader path: a v2 policy applies one draw to a whole tensor, and one call per
    image costs ~1 ms of Python. Chunks of 16 give 16 draws per 256-image batch at ~16 ms per batch.
    """

    def __init__(self, data: "TensorImages", batch_size: int, device, *, rank: int = 0, world: int = 1,
                 seed: int = 0, chunk: int = 16) -> None:
        self.images, self.labels = data.images.to(device), data.labels.to(device)
        self.augment, self.batch_size, self.chunk = data.transform, batch_size, max(1, chunk)
        self.rank, self.world, self.seed, self.epoch = rank, world, seed, 0
        self.per_rank = len(self.labels) // world
        self.drop_last = self.per_rank >= batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank // self.batch_size if self.drop_last else -(-self.per_rank // self.batch_size)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.labels), generator=g)[: self.per_rank * self.world][self.rank :: self.world]
        order = order.to(self.images.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            x = self.images[idx]
            if self.augment is not None:
                x = torch.cat([self.augment(part) for part in x.split(self.chunk)])
            yield x, self.labels[idx]
