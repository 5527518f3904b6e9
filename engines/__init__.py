"""Inference engines behind every worker, verified against the PyTorch reference.

An engine turns a batch of uint8 images, already resized and cropped to the checkpoint's resolution
(`store.resize_crop`), into logits. Normalisation happens inside the engine (`store.InputNormalizer`
is the first layer of every graph), so the request path carries small uint8 tensors.

    threads = worker_threads(workers=2)   # never more inference threads than cores, in all
    engine, manifest = load_engine("compact-fashion-mnist:latest", engine="auto", threads=threads)
    logits = engine(batch_uint8)          # (N, 1|3, R, R) uint8 -> (N, num_classes) float32
    engine.describe()                     # {"engine": "openvino", "precision": "fp32", "reason": ...}

Engines (`ENGINES`): `torch` (eager reference), `torch-compile`, `onnxruntime`, `onnxruntime-int8`,
`openvino`, `openvino-bf16` (where the CPU has bf16), `openvino-int8`; plus `auto`. Modules:
`base` (interface, reference), `export` (ONNX / OpenVINO IR / int8 artefacts and their cache),
`calibration`, `verify`, `onnxrt`, `openvino_rt`, `torch_compile`, `threads`, `loader`
(`load_engine`, auto-selection), `bench` (every engine timed), `prepare` (export, verify and choose ahead of serving: `make engines`, `effnet export`); and two
helpers for the jobs above them: `progress` (bars on a terminal, plain lines in logs) and
`side_by_side` (commands run at once, their lines prefixed).
"""
from __future__ import annotations

from .base import BuildContext, Engine, ServingGraph, TorchEngine
from .calibration import CALIBRATION_FILE, CalibrationSet, load_calibration, save_calibration
from .loader import AUTO, AUTO_CANDIDATES, ENGINES, FALLBACK, engine_names, load_engine
from .threads import available_cores, set_threads, worker_threads
from .verify import Verdict

__all__ = [
    "AUTO", "AUTO_CANDIDATES", "BuildContext", "CALIBRATION_FILE", "CalibrationSet", "ENGINES", "Engine",
    "FALLBACK", "ServingGraph", "TorchEngine", "Verdict", "available_cores", "engine_names",
    "load_calibration", "load_engine", "save_calibration", "set_threads", "worker_threads",
]
