"""The tiny checkpoint the engine tests share: compact, 4 classes, 32x32, briefly trained so its
predictions are decisive and low precisions can agree with it, exported once per session (the ONNX
exporter takes 15-30 s on 2 cores). `store` is registered as a fixture in conftest.py."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import engines
from engines import ENGINES, load_engine
from models import create_model, model_config
from store import InputNormalizer, Manifest, load_checkpoint, read_manifest, save_checkpoint

RES = 32
RUNNABLE = [n for n in ENGINES if n not in ("torch", "torch-compile") and ENGINES[n].unavailable() is None]


def _images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four easy classes: which colour channel (or none: gray) is bright, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    x = torch.randint(0, 90, (n, 3, RES, RES), generator=g)
    for c in range(3):
        x[labels == c, c] += 150
    x[labels == 3] += 100
    return x.clamp(0, 255).to(torch.uint8), labels


def _train_tiny(manifest: Manifest) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("compact", num_classes=4)
    norm = InputNormalizer(manifest)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(30):
        x, y = _images(32, seed=step)
        loss = torch.nn.functional.cross_entropy(model(norm(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    """(home, tag) of a trained tiny checkpoint with its calibration set, exported once."""
    home = tmp_path_factory.mktemp("engines") / "bentoml"
    man = Manifest(variant="compact", config=model_config("compact").to_dict(), num_classes=4,
                   classes=["red", "green", "blue", "gray"], dataset="synthetic-colours", resolution=RES)
    tag = save_checkpoint(_train_tiny(man), man, home=home)
    _, folder = read_manifest(tag, home)
    images, labels = _images(128, seed=1000)  # the checkpoint's "training data"; 99% allows 1 flip
    engines.save_calibration(folder, images, labels)
    for name in RUNNABLE:  # export and verify every engine once; tests below read the cache
        load_engine(tag, engine=name, threads=2, home=str(home))
    return home, tag


def _reference(tag, home, x):
    model, man = load_checkpoint(tag, home=home)
    return engines.TorchEngine(model, man)(x)


def _copy_store(home: Path, dest: Path) -> Path:
    shutil.copytree(home, dest / "bentoml")
    return dest / "bentoml"


