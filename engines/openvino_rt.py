"""OpenVINO engines on the CPU: fp32, bf16 (where the CPU supports it) and int8 (from the QDQ model).

Static shapes: one compiled model per batch size the worker will see, inputs padded up to the
nearest (`run_in_buckets`). OpenVINO with a static shape was the fastest engine measured here.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from .base import BuildContext, Engine, as_rgb, run_in_buckets
from .export import _locked, cache_dir, find_cached, int8_cached, int8_path, onnx_key, onnx_path, openvino_key, openvino_path

OV_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8 comes from the graph's FakeQuantize ops
# OpenVINO's own cache of compiled models (CACHE_DIR), one folder per checkpoint's weights, beside the
# artefacts, for the int8 engine only: the int8 graph compiles slowly (b0: 22-33 s, 8 s from the
# cache), fp32 in 1-3 s with blobs of fp32 weights (b0: 16 MB per batch size), so fp32 is not cached.
# The key is OpenVINO's own (model, shape, configuration, version): a stale blob is never reused.
COMPILED_DIR = "openvino-compiled"


def cpu_capabilities() -> list[str]:
    import openvino as ov

    return list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def _compiled_dir(ctx: BuildContext) -> Path:
    return cache_dir(ctx.folder, ctx.manifest) / COMPILED_DIR


@contextlib.contextmanager
def _cache_lock(folder: Path | None):
    """Yields the folder to cache in, locked; None (compile without a cache) where there is none or it
    cannot be written (a read-only store still serves)."""
    with contextlib.ExitStack() as stack:
        try:
            if folder is not None:
                stack.enter_context(_locked(folder))
        except OSError:
            folder = None
        yield folder


class OpenVinoEngine(Engine):
    name = "openvino"
    runtime = "openvino"
    precision = "fp32"

    def __init__(self, model_file: Path, threads: int, batch_sizes, resolution: int,
                 compiled_cache: Path | None = None) -> None:
        import openvino as ov

        core = ov.Core()
        config = {
            "INFERENCE_PRECISION_HINT": OV_PRECISION[self.precision],
            "INFERENCE_NUM_THREADS": threads,
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",
            # NOTE: no pinning: with several workers each pinning its threads, two can land on the
            # same core; the kernel scheduler spreads them better.
            "ENABLE_CPU_PINNING": False,
        }
        model = core.read_model(str(model_file))
        self.buckets = tuple(sorted(set(batch_sizes)))
        self.compiled = {}
        # OpenVINO does not lock its cache files: two processes of one variant compiling at once could
        # read a blob the other is still writing. One at a time; the second then loads from the cache.
        with _cache_lock(compiled_cache) as cache:
            if cache is not None:
                core.set_property({"CACHE_DIR": str(cache)})
            for b in self.buckets:
                model.reshape([b, 3, resolution, resolution])
                self.compiled[b] = core.compile_model(model, "CPU", config)
        self.requests = {b: c.create_infer_request() for b, c in self.compiled.items()}
        got = self.compiled[self.buckets[0]].get_property("INFERENCE_PRECISION_HINT")
        self.artefacts = tuple(p for p in (Path(model_file), Path(model_file).with_suffix(".bin")) if p.is_file())
        self.reason = (f"OpenVINO {ov.__version__.split('-')[0]}, CPU, inference precision {got}, "
                       f"{threads} thread(s), static batch {list(self.buckets)}")

    @classmethod
    def unavailable(cls, device: str = "cpu") -> str | None:
        if device != "cpu":
            return "the OpenVINO engines here run on the CPU only"
        try:
            import openvino  # noqa: F401
        except ImportError:
            return "openvino is not installed"
        return None

    @classmethod
    def build(cls, ctx: BuildContext) -> "OpenVinoEngine":
        xml = openvino_path(onnx_path(ctx.model_fn, ctx.manifest, ctx.folder), ctx.manifest, ctx.folder)
        return cls(xml, ctx.threads, ctx.batch_sizes, ctx.manifest.resolution)

    @classmethod
    def cached(cls, ctx: BuildContext) -> bool:
        return (find_cached(ctx.folder, ctx.manifest, onnx_key(), "model.onnx") is not None
                and find_cached(ctx.folder, ctx.manifest, openvino_key(), "model.xml", "model.bin") is not None)

    def _run(self, x: torch.Tensor, b: int) -> torch.Tensor:
        req = self.requests[b]
        req.infer({0: np.ascontiguousarray(x.numpy())})
        return torch.from_numpy(req.get_output_tensor(0).data.copy())

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return run_in_buckets(as_rgb(images), self.buckets, self._run)


class OpenVinoBf16Engine(OpenVinoEngine):
    name = "openvino-bf16"
    precision = "bf16"

    @classmethod
    def unavailable(cls, device: str = "cpu") -> str | None:
        reason = super().unavailable(device)
        if reason is None and "BF16" not in cpu_capabilities():
            # OpenVINO would silently run f32 under a bf16 hint: do not offer a bf16 that is not.
            reason = "this CPU has no bf16 support (OpenVINO reports " + ", ".join(cpu_capabilities()) + ")"
        return reason


class OpenVinoInt8Engine(OpenVinoEngine):
    """The static int8 QDQ model (`engines.export.quantize_int8`) compiled by OpenVINO."""

    name = "openvino-int8"
    precision = "int8"

    @classmethod
    def unavailable(cls, device: str = "cpu") -> str | None:
        reason = super().unavailable(device)
        if reason is None and "INT8" not in cpu_capabilities():
            reason = "OpenVINO reports no int8 support on this CPU"
        return reason

    @classmethod
    def build(cls, ctx: BuildContext) -> "OpenVinoInt8Engine":
        problem = ctx.calibration.int8_problem()
        if problem:
            raise RuntimeError(problem)
        q = int8_path(onnx_path(ctx.model_fn, ctx.manifest, ctx.folder), ctx.calibration, ctx.manifest, ctx.folder)
        # OpenVINO reads the QDQ ONNX directly (its FakeQuantize ops become int8 kernels); no IR cached.
        return cls(q, ctx.threads, ctx.batch_sizes, ctx.manifest.resolution, _compiled_dir(ctx))

    @classmethod
    def cached(cls, ctx: BuildContext) -> bool:
        return int8_cached(ctx)  # OpenVINO's own compiled-model cache is rebuilt in seconds when missing
