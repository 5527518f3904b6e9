"""The `Engine` interface, the eager PyTorch reference, and the graph every engine runs.

An engine turns a batch of uint8 images, already resized and cropped to the checkpoint's resolution
(`store.resize_crop`), into float32 logits. Normalisation happens inside the engine
(`store.InputNormalizer` is the first layer of every graph), so the request path carries small
uint8 tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from store import InputNormalizer, Manifest


class ServingGraph(nn.Module):
    """uint8 images -> logits: the normaliser in front of the network, the one graph every engine runs.

    A module with a named `images` argument (not an `nn.Sequential`) so the ONNX graph's input is
    called `images` and `torch.export` can name its dynamic batch dimension.
    """

    def __init__(self, model: nn.Module, manifest: Manifest) -> None:
        super().__init__()
        self.normalize = InputNormalizer(manifest)
        self.net = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(images))


class Engine:
    """Common interface: `__call__(uint8 NCHW) -> float32 logits`, plus a description for /variants."""

    name = "base"
    runtime = "base"
    precision = "fp32"
    reason = ""
    artefacts: tuple[Path, ...] = ()  # exported files it runs (hashed into its verification record)
    upgrade: Any = None  # a Future of the engine that replaces this stand-in once rebuilt (engines.loader)

    @classmethod
    def unavailable(cls, device: str = "cpu") -> str | None:
        """Why this engine cannot run here (library missing, CPU lacks bf16, ...), else None."""
        return None

    @classmethod
    def build(cls, ctx: "BuildContext") -> "Engine":  # pragma: no cover - interface
        raise NotImplementedError

    @classmethod
    def cached(cls, ctx: "BuildContext") -> bool:
        """Whether `build` would only load stored files (nothing to export, convert or quantize): always
        for the eager engines; for an exported one, when its files are there and whole."""
        return True

    def __call__(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def warmup(self, batch_sizes: Sequence[int], resolution: int, channels: int = 3) -> None:
        """Run once per batch size so the first request pays no allocation or compilation."""
        for b in batch_sizes:
            self(torch.zeros(b, channels, resolution, resolution, dtype=torch.uint8))

    def describe(self) -> dict[str, Any]:
        """Which engine and precision serve, and why; with the verification figures and, after
        `auto`, the timings and the refused engines (set by `engines.load_engine`)."""
        d: dict[str, Any] = {"engine": self.name, "precision": self.precision, "reason": self.reason}
        v = getattr(self, "verification", None)
        if v is not None and hasattr(v, "ok"):
            d["verification"] = {"ok": v.ok, **v.metrics}
        for attr in ("timings_ms", "refused"):
            if getattr(self, attr, None):
                d[attr] = getattr(self, attr)
        return d


class _EagerEngine(Engine):
    """Eager PyTorch engines: `_run` one batch; on a GPU pad to the fixed sizes in `buckets` first."""

    buckets: tuple[int, ...] = ()

    def _run(self, images: torch.Tensor, b: int = 0) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return run_in_buckets(images, self.buckets, self._run) if self.buckets else self._run(images)


class TorchEngine(_EagerEngine):
    """PyTorch eager, channels_last, inference_mode: the reference every other engine is checked against."""

    name = "torch"
    runtime = "torch"

    def __init__(self, model: nn.Module, manifest: Manifest, device: str = "cpu",
                 batch_sizes: Sequence[int] | None = None) -> None:
        self.device = torch.device(device)
        self.buckets = gpu_buckets(self.device, batch_sizes)
        if self.device.type == "cuda":
            # NOTE: the reference must be fp32. PyTorch lets cuDNN convolutions use TF32 by default
            # (a 10-bit mantissa), which alone can move logits past the 1e-3 fp32 tolerance that
            # every other engine is held to; faster reduced precision is the fp16 engine's job.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        self.graph = ServingGraph(model, manifest).eval().to(self.device)
        self.graph = self.graph.to(memory_format=torch.channels_last)
        self.reason = "reference engine (eager PyTorch)" + (
            f" on CUDA, TF32 off, static batch {list(self.buckets)}" if self.buckets else "")

    @classmethod
    def build(cls, ctx: "BuildContext") -> "TorchEngine":
        return cls(ctx.model_fn(), ctx.manifest, device=ctx.device, batch_sizes=ctx.batch_sizes)

    def _run(self, images: torch.Tensor, b: int = 0) -> torch.Tensor:
        with torch.inference_mode():
            x = images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            return self.graph(x).float().cpu()


def gpu_buckets(device: torch.device, batch_sizes: Sequence[int] | None) -> tuple[int, ...]:
    """The static batch sizes an eager engine pads to on a GPU (none on the CPU).

    An eager worker fed every batch size from 1 to 32 stalls 2-6 s at each new shape while cuDNN
    plans it (benchmarks/gpu/README.md); with a few fixed sizes that is paid once, at warm-up, on the
    thread that serves (PyTorch caches the plans per thread). On the CPU oneDNN has no such cost.
    """
    if device.type != "cuda" or not batch_sizes:
        return ()
    torch.backends.cudnn.benchmark = True
    return tuple(sorted(set(batch_sizes)))


class TorchFp16Engine(_EagerEngine):
    """Eager PyTorch in half precision on a GPU: the network's weights and activations in fp16.

    The normaliser stays fp32 (uint8 -> float is exact there) and hands the network an fp16 tensor;
    logits come back as fp32. Verified like the other reduced precisions (top-1 agreement and test
    top-1 drop), since fp16 logits cannot meet the fp32 tolerance.
    """

    name = "torch-fp16"
    runtime = "torch"
    precision = "fp16"

    def __init__(self, model: nn.Module, manifest: Manifest, device: str = "cuda",
                 batch_sizes: Sequence[int] | None = None) -> None:
        self.device = torch.device(device)
        self.buckets = gpu_buckets(self.device, batch_sizes)
        self.normalize = InputNormalizer(manifest).to(self.device)
        self.net = model.eval().to(self.device, memory_format=torch.channels_last).half()
        self.reason = "eager PyTorch, fp16 weights and activations, channels_last" + (
            f", static batch {list(self.buckets)}" if self.buckets else "")

    @classmethod
    def unavailable(cls, device: str = "cpu") -> str | None:
        if not device.startswith("cuda"):
            return "fp16 eager is a GPU engine (CPU fp16 kernels are slower than fp32)"
        return None

    @classmethod
    def build(cls, ctx: "BuildContext") -> "TorchFp16Engine":
        return cls(ctx.model_fn(), ctx.manifest, device=ctx.device, batch_sizes=ctx.batch_sizes)

    def _run(self, images: torch.Tensor, b: int = 0) -> torch.Tensor:
        with torch.inference_mode():
            x = self.normalize(images.to(self.device, non_blocking=True)).half()
            return self.net(x.contiguous(memory_format=torch.channels_last)).float().cpu()


def run_in_buckets(images: torch.Tensor, buckets: Sequence[int], run) -> torch.Tensor:
    """Run a static-shape engine on any batch: pad up to the nearest bucket, split above the largest.

    Static shapes are faster on OpenVINO and avoid a recompile per batch size under torch.compile;
    zero padding costs the padded rows' compute, which is why the buckets are the worker's own sizes.
    """
    n = images.shape[0]
    top = max(buckets)
    if n > top:
        return torch.cat([run_in_buckets(images[i:i + top], buckets, run) for i in range(0, n, top)])
    b = min(s for s in buckets if s >= n)
    if b != n:
        pad = images.new_zeros((b - n, *images.shape[1:]))
        images = torch.cat([images, pad])
    return run(images, b)[:n]


@dataclass
class BuildContext:
    """What an engine needs to build itself from a stored checkpoint."""

    folder: Path  # the checkpoint's folder in the store
    manifest: Manifest
    model_fn: Callable[[], nn.Module]  # builds the verified eager model (only when an export is needed)
    threads: int
    device: str = "cpu"
    batch_sizes: tuple[int, ...] = (1, 8)
    calibration: Any = None  # engines.calibration.CalibrationSet, loaded lazily by the loader


def as_rgb(images: torch.Tensor) -> torch.Tensor:
    """Exported graphs take 3 channels: a grayscale batch is replicated (the normaliser's own rule)."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
