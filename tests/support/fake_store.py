"""Tiny fake-data checkpoints and a serving configuration for the load-test smoke run.

Random weights alone give useless fakes here: with untouched BatchNorm statistics the 32x32 networks
answer every image with the same near-uniform scores, so the top-1 is a tie that any rounding can
flip. Each fake's BatchNorm statistics are therefore recomputed on the images it will be sent (one
forward pass in training mode), which gives every image its own, decisive answer. The weights stay
random: accuracy is near chance, and only its equality with the offline evaluation is tested.
"""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

from loadtest.images import FASHION_MNIST_CLASSES, fashion_mnist, photos

# Served name -> (registry variant, dataset). The names match the default configuration's.
DEFAULT_FAKES = {"compact": ("compact", "fashion-mnist"), "mec": ("mec-out-e3", "fashion-mnist"),
                 "lite0": ("lite0", "imagenet")}
RESOLUTION = 32  # fakes are served at 32x32, photos included: the smoke test is about the plumbing


def _calibrate_bn(model: torch.nn.Module, x: torch.Tensor) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration pass
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()


def make_fake_checkpoint(home: Path, name: str, variant: str, dataset: str, seed: int = 0) -> str:
    from models import count_macs, count_params, create_model, model_config
    from store import Manifest, InputNormalizer, resize_crop, save_checkpoint

    from loadtest.offline import decode

    torch.manual_seed(seed)
    if dataset == "fashion-mnist":
        classes, images, gray = FASHION_MNIST_CLASSES, fashion_mnist(64), True
    else:
        from models.pretrained import imagenet_classes

        classes, images, gray = imagenet_classes(), photos(), False
    model = create_model(variant, num_classes=len(classes))
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    torch.nn.init.normal_(head.weight, std=1.0)
    man = Manifest(variant=variant, config=model_config(variant).to_dict(), num_classes=len(classes),
                   classes=list(classes), dataset=dataset, resolution=RESOLUTION, grayscale=gray,
                   mean=[0.5] * 3 if gray else [0.485, 0.456, 0.406], std=[0.5] * 3 if gray else [0.229, 0.224, 0.225],
                   metrics={"top1": round(1 / len(classes), 4)}, params=count_params(model),
                   training={"fake": "random weights, BatchNorm statistics from the load-test images"})
    x = torch.cat([resize_crop(decode(im.data, man), man) for im in images])
    _calibrate_bn(model, InputNormalizer(man)(x))
    man.macs = count_macs(model, RESOLUTION)
    return save_checkpoint(model, man, name=name, home=home)


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
