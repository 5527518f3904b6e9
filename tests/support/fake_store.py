"""Tiny fake-data checkpoints and a serving configuration for the load-test smoke run.

The weights are random, so accuracy is near chance and only its equality with the offline evaluation
is tested; each fake's BatchNorm statistics come from the very images the load test sends
(`make_checkpoint(calibrate_on=...)`), so that every image gets its own, decisive answer and no
rounding can flip a tie.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from loadtest.images import fashion_mnist, photos
from store.fashion_mnist import CLASSES as FASHION_MNIST_CLASSES
from tests.support.serving import make_checkpoint

# Served name -> (registry variant, dataset). The names match the default configuration's.
DEFAULT_FAKES = {"compact": ("compact", "fashion-mnist"), "mec": ("mec-out-e3", "fashion-mnist"),
                 "lite0": ("lite0", "imagenet")}
RESOLUTION = 32  # fakes are served at 32x32, photos included: the smoke test is about the plumbing


def make_fake_checkpoint(home: Path, name: str, variant: str, dataset: str, seed: int = 0) -> str:
    if dataset == "fashion-mnist":
        classes, images, gray = FASHION_MNIST_CLASSES, fashion_mnist(64), True
    else:
        from models.pretrained import imagenet_classes

        classes, images, gray = imagenet_classes(), photos(), False
    return make_checkpoint(home, name, variant, classes, RESOLUTION, grayscale=gray, seed=seed, dataset=dataset,
                           calibrate_on=[im.data for im in images])


def make_fake_store(home: Path, fakes: dict[str, tuple[str, str]] | None = None, shadow: str | None = "mec",
                    threads: int = 1) -> Path:
    """Fake checkpoints in `home` and a serving configuration for them; returns the config path."""
    fakes = fakes or DEFAULT_FAKES
    home = Path(home)
    tags = {n: make_fake_checkpoint(home, f"{n}-fake", v, ds, seed=i) for i, (n, (v, ds)) in enumerate(fakes.items())}
    fashion = [n for n, (_, ds) in fakes.items() if ds == "fashion-mnist"]
    imagenet = [n for n, (_, ds) in fakes.items() if ds == "imagenet"]
    routes = {}
    if fashion:
        routes["fashion"] = {"split": {n: round(1 / len(fashion), 4) for n in fashion}}
        if shadow in fashion and len(fashion) > 1:
            routes["fashion"]["shadow"] = {"variant": shadow, "fraction": 0.5}
    if imagenet:
        routes["imagenet"] = {"split": {n: round(1 / len(imagenet), 4) for n in imagenet}}
    cfg = {
        "server": {"cpu_threads": threads},
        "default_route": next(iter(routes)),
        # max_latency_ms far above the smoke run's latencies: a batcher 503 would be a false failure.
        "variants": {n: {"model": t, "engine": "torch", "max_batch_size": 8, "max_latency_ms": 2000}
                     for n, t in tags.items()},
        "routes": routes,
    }
    path = home / "loadtest-serve.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
