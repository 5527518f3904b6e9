"""`effnet bench --engines ...`: every engine and precision of each model, interleaved.

Random-initialised models at 1000 classes (speed does not depend on the weights), exported to a
temporary folder; every engine takes uint8 input and normalises inside its graph, the eager
reference (`torch`, fp32) included, so the rows compare like with like.
# NOTE: int8 is calibrated here on uint8 noise: the ranges are wrong for real images but the kernels,
# and so the speed, are the same. Served int8 engines are calibrated on the checkpoint's own data.
"""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from models.bench import Cell, build_bench_model
from store import Manifest

from .base import Engine, TorchEngine, TorchFp16Engine
from .calibration import CalibrationSet
from .export import export_onnx, quantize_int8
from .loader import ENGINES
from .onnxrt import OnnxRuntimeEngine, OnnxRuntimeInt8Engine
from .openvino_rt import OpenVinoBf16Engine, OpenVinoEngine, OpenVinoInt8Engine
from .torch_compile import TorchCompileEngine

log = logging.getLogger(__name__)


def select_engines(spec: str, device: str = "cpu") -> list[str]:
    """'all' -> every engine that can run here; else a comma-separated list (unknown names fail)."""
    if spec == "all":
        return [n for n, cls in ENGINES.items() if cls.unavailable(device) is None]
    names = [n.strip() for n in spec.split(",") if n.strip()]
    for n in names:
        if n not in ENGINES:
            raise KeyError(f"unknown engine {n!r}; available: all, {', '.join(ENGINES)}")
    return names


def skipped_engines(device: str = "cpu") -> dict[str, str]:
    """Engines that cannot run on this machine, with the reason (printed and recorded with the run)."""
    return {n: why for n, cls in ENGINES.items() if (why := cls.unavailable(device))}


def build_engines(model_name: str, engines: list[str], resolution: int, batches: list[int], threads: int,
                  workdir: Path, progress: Callable[[str], None] | None = None, device: str = "cpu",
                  failed: dict[str, str] | None = None) -> dict[str, Engine]:
    """Every engine of `engines` for one model; one that fails to build is left out and its error
    recorded in `failed` (`model/engine: error`), so one broken runtime does not lose the whole run."""
    for name in list(engines):
        why = ENGINES[name].unavailable(device) if name in ENGINES else None
        if why and failed is not None:  # e.g. onnxruntime without its CUDA provider on a GPU
            failed[f"{model_name}/{name}"] = f"unavailable: {why}"
            engines = [e for e in engines if e != name]
    torch.manual_seed(0)  # the same weights every run: torch-compile's cache then hits on a rerun
    model = build_bench_model(model_name).eval()
    man = Manifest(variant=model_name, config={}, num_classes=1000, classes=[], dataset="none", resolution=resolution)
    built: dict[str, Engine] = {}
    onnx_file = workdir / f"{model_name}.onnx"
    int8_file = workdir / f"{model_name}.int8.onnx"
    xml = workdir / f"{model_name}.xml"

    def need(*names: str) -> bool:
        return any(n in engines for n in names)

    if need("onnxruntime", "onnxruntime-int8", "openvino", "openvino-bf16", "openvino-int8"):
        if progress:
            progress(f"exporting {model_name} to ONNX")
        export_onnx(model, man, onnx_file)
    if need("openvino", "openvino-bf16"):
        import openvino as ov

        ov.save_model(ov.convert_model(str(onnx_file)), str(xml), compress_to_fp16=False)
    if need("onnxruntime-int8", "openvino-int8"):
        if progress:
            progress(f"quantising {model_name} to int8")
        g = torch.Generator().manual_seed(0)
        noise = torch.randint(0, 256, (64, 3, resolution, resolution), dtype=torch.uint8, generator=g)
        quantize_int8(onnx_file, CalibrationSet(noise, None, "noise"), int8_file)
    def copy() -> torch.nn.Module:
        fresh = build_bench_model(model_name).eval()
        fresh.load_state_dict(model.state_dict())
        return fresh

    for name in engines:
        t0 = time.perf_counter()
        if progress:
            progress(f"building {model_name} on {name}")
        try:
            if name == "torch":
                eng: Engine = TorchEngine(model, man, device=device)
            elif name == "torch-fp16":
                eng = TorchFp16Engine(copy(), man, device=device)
            elif name == "torch-compile":
                eng = TorchCompileEngine(copy(), man, device=device, batch_sizes=batches)
            elif name == "onnxruntime":
                eng = OnnxRuntimeEngine(onnx_file, threads, device)
            elif name == "onnxruntime-int8":
                eng = OnnxRuntimeInt8Engine(int8_file, threads, device)
            elif name in ("openvino", "openvino-bf16"):
                cls = OpenVinoEngine if name == "openvino" else OpenVinoBf16Engine
                eng = cls(xml, threads, batches, resolution)
            elif name == "openvino-int8":
                eng = OpenVinoInt8Engine(int8_file, threads, batches, resolution)
            else:
                raise KeyError(name)
            eng.warmup(batches, resolution)  # torch-compile compiles here
        except Exception as e:  # noqa: BLE001 - recorded with the run, not fatal to it
            if failed is None:
                raise
            failed[f"{model_name}/{name}"] = f"{type(e).__name__}: {e}"[:500]
            log.warning("%s on %s failed: %s", model_name, name, failed[f"{model_name}/{name}"])
            continue
        built[name] = eng
        log.info("%s on %s ready in %.1f s", model_name, name, time.perf_counter() - t0)
    return built


def run_engine_bench(
    names: list[str],
    engines: list[str],
    batches: list[int],
    resolution: int = 224,
    rounds: int = 3,
    seconds: float = 0.6,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
    device: str = "cpu",
    failed: dict[str, str] | None = None,
) -> list[dict]:
    """Time every (model, engine, batch); round r times all of them before round r+1 starts.

    Input is a uint8 batch in host memory and output float logits back in host memory, as a worker
    sees them: on a GPU the copies both ways are part of every figure. With `failed` given, an
    engine that fails to build is recorded there and left out instead of ending the run. `progress`
    is told what runs now: an `engines.progress.StatusLine` fits a terminal and a log alike.
    """
    threads = threads or torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="effnet-bench-") as tmp:
        built = {n: build_engines(n, engines, resolution, batches, threads, Path(tmp), progress, device, failed)
                 for n in names}
        inputs = {b: torch.randint(0, 256, (b, 3, resolution, resolution), dtype=torch.uint8) for b in batches}
        cells = {(n, e, b): Cell(n, b, [], engine=e, precision=built[n][e].precision)
                 for n in names for e in engines if e in built[n] for b in batches}
        for r in range(rounds):
            for n in names:
                for e in engines:
                    if e not in built[n]:
                        continue
                    eng = built[n][e]
                    for b in batches:
                        if progress:
                            progress(f"round {r + 1}/{rounds} {n} {e} batch {b}")
                        times, deadline = cells[n, e, b].times, time.perf_counter() + seconds
                        while True:
                            t0 = time.perf_counter()
                            eng(inputs[b])
                            t1 = time.perf_counter()
                            times.append(t1 - t0)
                            if t1 >= deadline and len(times) >= 2 * (r + 1):
                                break
    return [cells[n, e, b].row() for n in names for e in engines for b in batches if (n, e, b) in cells]


def format_engine_table(rows: list[dict]) -> str:
    """One line per (model, engine, batch), with the speed-up over the same model's eager row."""
    ref = {(r["name"], r["batch"]): r for r in rows if r.get("engine") == "torch"}
    lines = [
        f"{'model':<16} {'engine':<17} {'prec':<5} {'batch':>5} {'ms/batch':>9} {'min ms':>8} {'images/s':>9} "
        f"{'vs torch':>9}",
        "-" * 84,
    ]
    for r in rows:
        base = ref.get((r["name"], r["batch"]))
        rel = f"{r['images_per_s'] / base['images_per_s']:.2f}x" if base else "-"
        lines.append(
            f"{r['name']:<16} {r['engine']:<17} {r['precision']:<5} {r['batch']:>5} {r['latency_ms']:>9.2f} "
            f"{r['latency_min_ms']:>8.2f} {r['images_per_s']:>9.1f} {rel:>9}"
        )
    return "\n".join(lines)
