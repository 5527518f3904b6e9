"""ONNX Runtime engines: fp32 and static int8 (QDQ) on the CPU; CUDA / TensorRT providers on a GPU.

Dynamic batch: one session serves every batch size without padding.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .base import BuildContext, Engine, as_rgb
from .export import find_cached, int8_cached, int8_path, onnx_key, onnx_path


def _providers(device: str) -> list:
    """TensorRT, then CUDA, then CPU on a GPU device (what the installed build has); CPU otherwise.

    The CPU wheel of onnxruntime has no CUDA provider; `onnxruntime-gpu` replaces it where a GPU is present.
    """
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    if device.startswith("cuda"):
        dev = int(device.split(":")[1]) if ":" in device else 0
        chosen = []
        if "TensorrtExecutionProvider" in have:
            chosen.append(("TensorrtExecutionProvider", {"device_id": dev, "trt_fp16_enable": False}))
        if "CUDAExecutionProvider" in have:
            chosen.append(("CUDAExecutionProvider", {"device_id": dev}))
        return chosen + ["CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxRuntimeEngine(Engine):
    name = "onnxruntime"
    runtime = "onnxruntime"
    precision = "fp32"

    def __init__(self, model_file: Path, threads: int, device: str = "cpu") -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # No busy-waiting between ops: the worker shares its cores with the HTTP gateway and other
        # workers, and spinning threads steal their time (engines/threads.py).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(model_file), opts, providers=_providers(device))
        self.provider = self.session.get_providers()[0]
        self.artefacts = (Path(model_file),)
        self.reason = f"ONNX Runtime {ort.__version__}, {self.provider}, {threads} thread(s)"

    @classmethod
    def unavailable(cls, device: str = "cpu") -> str | None:
        try:
            import onnxruntime as ort
        except ImportError:
            return "onnxruntime is not installed"
        if device.startswith("cuda") and not {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(
            ort.get_available_providers()
        ):
            return "this onnxruntime build has no CUDA/TensorRT provider (install onnxruntime-gpu)"
        return None

    @classmethod
    def build(cls, ctx: BuildContext) -> "OnnxRuntimeEngine":
        return cls(onnx_path(ctx.model_fn, ctx.manifest, ctx.folder), ctx.threads, ctx.device)

    @classmethod
    def cached(cls, ctx: BuildContext) -> bool:
        return find_cached(ctx.folder, ctx.manifest, onnx_key(), "model.onnx") is not None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(as_rgb(images).numpy())
        return torch.from_numpy(self.session.run(None, {"images": x})[0])


class OnnxRuntimeInt8Engine(OnnxRuntimeEngine):
    """Static post-training int8 (QDQ), calibrated on the checkpoint's calibration set.

    Dynamic int8 is not offered: 4x slower than fp32 on a CPU (benchmarks/engines.md).
    """

    name = "onnxruntime-int8"
    precision = "int8"

    @classmethod
    def unavailable(cls, device: str = "cpu") -> str | None:
        if device.startswith("cuda"):
            return "int8 QDQ on the GPU needs TensorRT calibration; not offered"
        return super().unavailable(device)

    @classmethod
    def build(cls, ctx: BuildContext) -> "OnnxRuntimeInt8Engine":
        problem = ctx.calibration.int8_problem()
        if problem:
            raise RuntimeError(problem)
        fp32 = onnx_path(ctx.model_fn, ctx.manifest, ctx.folder)
        return cls(int8_path(fp32, ctx.calibration, ctx.manifest, ctx.folder), ctx.threads, ctx.device)

    @classmethod
    def cached(cls, ctx: BuildContext) -> bool:
        return int8_cached(ctx)
