"""Training throughput per variant (`effnet train-bench`): images/s of the real training step.

Measures the step `train_one_epoch` runs (channels_last, AdamW, label-smoothed CE, EMA update,
grad clipping) on random uint8 batches at one resolution, for each variant, interleaved over rounds.
Reports wall-clock images/s and images per CPU-second of this process x threads: on a machine shared
with other jobs the wall figure drops with the load while the CPU-time figure stays near what an idle
machine gives (NOTE: an estimate; spin-waiting threads and shared caches still inflate CPU time).
"""
from __future__ import annotations

import platform
import time

import torch
import torch.nn.functional as F


def train_step_throughput(variants: list[str], resolution: int = 32, batch: int = 128, steps: int = 6,
                          rounds: int = 2, in_chans: int = 1, num_classes: int = 10, threads: int = 0) -> list[dict]:
    from models import create_model, get_variant

    from .loop import ModelEma

    if threads:
        torch.set_num_threads(threads)
    nthreads = torch.get_num_threads()
    nets = {}
    for v in variants:
        name = get_variant(v).name
        torch.manual_seed(0)
        m = create_model(name, num_classes=num_classes, in_chans=in_chans, drop_rate=0.1, drop_path_rate=0.05)
        m = m.to(memory_format=torch.channels_last).train()
        nets[name] = (m, torch.optim.AdamW(m.parameters(), 1e-3), ModelEma(m, 0.995))
    x = torch.randn(batch, in_chans, resolution, resolution).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch,))
    stats = {n: {"wall": 0.0, "cpu": 0.0, "images": 0} for n in nets}
    for r in range(rounds):
        for name, (m, opt, ema) in nets.items():
            for i in range(steps + (1 if r == 0 else 0)):
                w0, c0 = time.perf_counter(), time.process_time()
                loss = F.cross_entropy(m(x), y, label_smoothing=0.1)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(m.parameters(), 2.0)
                opt.step()
                ema.update(m)
                if r == 0 and i == 0:
                    continue  # warm-up step: allocator and kernel selection
                s = stats[name]
                s["wall"] += time.perf_counter() - w0
                s["cpu"] += time.process_time() - c0
                s["images"] += batch
    rows = []
    for name, s in stats.items():
        rows.append({
            "variant": name, "resolution": resolution, "batch": batch, "threads": nthreads, "images": s["images"],
            "images_per_s": round(s["images"] / s["wall"], 1),
            # images per CPU-second times the threads: what the wall figure would be with the cores to itself
            "images_per_s_cpu_time": round(s["images"] / s["cpu"] * nthreads, 1),
            "cpu_share": round(s["cpu"] / s["wall"] / nthreads, 2),
        })
    return rows


def machine() -> dict:
    import os

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "loadavg": load}
