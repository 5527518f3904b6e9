"""Offline speed of the zoo: batch-1 latency and batch-N throughput, models interleaved.

Interleaving (round r times every model and batch before round r+1 starts) spreads machine noise
over all models alike, so the ratios between models are more trustworthy than the absolute figures.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

REFERENCE = "torchvision-b0"


def machine_info() -> dict:
    """The machine a figure is measured on (date, host, CPU model, cores, torch, GPU): the one description
    of a host that the benchmarks and the load-test records use."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def build_bench_model(name: str) -> nn.Module:
    """A registered variant, or torchvision's own efficientnet_b0 as the reference."""
    if name == REFERENCE:
        from torchvision.models import efficientnet_b0

        return efficientnet_b0()
    from models import create_model

    return create_model(name)


@dataclass
class Cell:
    name: str
    batch: int
    times: list[float]
    engine: str = "torch"  # the eager reference; `effnet bench --engines` times the others
    precision: str = "fp32"

    def row(self) -> dict:
        med = statistics.median(self.times)
        return {
            "name": self.name,
            "engine": self.engine,
            "precision": self.precision,
            "batch": self.batch,
            "latency_ms": round(med * 1e3, 3),
            "latency_min_ms": round(min(self.times) * 1e3, 3),
            "images_per_s": round(self.batch / med, 2),
            "iterations": len(self.times),
        }


def run_bench(
    names: list[str],
    batches: list[int],
    resolution: int = 224,
    rounds: int = 3,
    seconds: float = 0.6,
    device: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Time every (model, batch) pair; each round gives each pair about `seconds` of iterations."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    models = {}
    for n in names:
        m = build_bench_model(n).eval().to(device, memory_format=torch.channels_last)
        models[n] = m
    inputs = {
        b: torch.randn(b, 3, resolution, resolution, device=device).contiguous(memory_format=torch.channels_last)
        for b in batches
    }
    cells = {(n, b): Cell(n, b, []) for n in names for b in batches}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.inference_mode():
        for n, m in models.items():  # warm-up: allocator, kernels, caches
            for b in batches:
                m(inputs[b])
        for r in range(rounds):
            for n, m in models.items():
                for b in batches:
                    if progress:
                        progress(f"round {r + 1}/{rounds} {n} batch {b}")
                    deadline = time.perf_counter() + seconds
                    while True:
                        sync()
                        t0 = time.perf_counter()
                        m(inputs[b])
                        sync()
                        t1 = time.perf_counter()
                        cells[n, b].times.append(t1 - t0)
                        if t1 >= deadline and len(cells[n, b].times) >= 2 * (r + 1):
                            break
    return [cells[n, b].row() for n in names for b in batches]


def format_table(rows: list[dict]) -> str:
    ref = {r["batch"]: r for r in rows if r["name"] == REFERENCE}
    lines = [
        f"{'model':<18} {'batch':>5} {'ms/batch':>9} {'min ms':>8} {'images/s':>9} {'vs ' + REFERENCE:>18}",
        "-" * 72,
    ]
    for r in rows:
        base = ref.get(r["batch"])
        rel = f"{r['images_per_s'] / base['images_per_s']:.2f}x" if base else "-"
        lines.append(
            f"{r['name']:<18} {r['batch']:>5} {r['latency_ms']:>9.2f} {r['latency_min_ms']:>8.2f} "
            f"{r['images_per_s']:>9.1f} {rel:>18}"
        )
    return "\n".join(lines)
