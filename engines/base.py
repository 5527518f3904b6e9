"""Inference engines behind every worker.

An engine turns a batch of uint8 images, already resized and cropped to the checkpoint's resolution
(`store.resize_crop`), into logits. Normalisation happens inside the engine (`store.InputNormalizer`
is the first layer of every graph), so the request path carries small uint8 tensors.

    engine, manifest = load_engine("compact-fashion-mnist:latest", engine="torch", threads=1)
    logits = engine(batch_uint8)          # (N, C, R, R) uint8 -> (N, num_classes) float32
    engine.describe()                     # {"engine": "torch", "precision": "fp32", "reason": ...}

Only the PyTorch eager reference lives here so far; compiled engines (ONNX Runtime, OpenVINO,
torch.compile) plug in behind the same interface.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from store import InputNormalizer, Manifest, load_checkpoint


class Engine:
    """Common interface: `__call__(uint8 NCHW) -> float logits`, plus a description for /variants."""

    name = "base"
    precision = "fp32"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "precision": self.precision, "reason": getattr(self, "reason", "")}


class TorchEngine(Engine):
    """PyTorch eager, channels_last, inference_mode: the reference every other engine is checked against."""

    name = "torch"

    def __init__(self, model: nn.Module, manifest: Manifest, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.graph = nn.Sequential(InputNormalizer(manifest), model).eval().to(self.device)
        self.graph = self.graph.to(memory_format=torch.channels_last)
        self.reason = "reference engine (eager PyTorch)"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            x = images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            return self.graph(x).float().cpu()


def set_threads(threads: int | None) -> int:
    """Pin this process's intra-op threads (oversubscribing 2 cores made eager 13x slower here)."""
    n = threads or max(1, (os.cpu_count() or 1))
    torch.set_num_threads(n)
    return n


def load_engine(
    tag_or_path: str,
    engine: str = "torch",
    threads: int | None = None,
    device: str = "cpu",
    home: str | None = None,
) -> tuple[Engine, Manifest]:
    """Verify and load a checkpoint, then wrap it in the named engine."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; available: {', '.join(ENGINES)}")
    set_threads(threads)
    model, manifest = load_checkpoint(tag_or_path, home=home, device=device)
    return ENGINES[engine](model, manifest, device=device), manifest


ENGINES: dict[str, type[Engine]] = {"torch": TorchEngine}
