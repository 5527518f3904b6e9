"""One BentoML worker service per served variant: a verified checkpoint behind adaptive batching.

Each worker is its own process (`bentoml.depends` from the gateway), built from the configuration at
import time so that every variant gets its own `max_batch_size`/`max_latency_ms` and resources.
- Device: CUDA when the variant asks for GPUs (`gpu: 1` or a fraction) and CUDA is present, with
  `resources={"gpu": ...}`; otherwise the CPU.
- CPU threads: every CPU worker uses the server's thread budget (default: the cores available) but
  runs a batch only while holding an exclusive lock on a file that all workers of the server share
  (`CpuGate`). So at most `cpu_threads` inference threads run at any time, however many variants are
  served: oversubscribing these 2 cores made eager PyTorch 13x slower (FACTS.md), while one batch at a
  time with all cores loses nothing.
- A checkpoint that is missing, corrupted or mismatched does not crash the process (a crash would be
  restarted in a loop): the worker logs the checkpoint and the problem, reports them through
  `status`, stays not ready, and refuses `predict` with 503.
- `predict` takes uint8 (N, 3, R, R) already cropped by the gateway and returns float32 (N, K + 1):
  the K softmax scores, then the seconds its batch took, from which the gateway derives queue wait.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
from bentoml.exceptions import ServiceUnavailable

from . import metrics
from .config import ServingConfig, VariantConfig, variant_device, variant_threads

logger = logging.getLogger("effnet.worker")


def cpu_lock_path() -> Path:
    """Shared by every worker of one server (they share BENTOML_HOME, tests give each server its own)."""
    home = Path(os.environ.get("BENTOML_HOME") or Path.home() / "bentoml")
    return Path(os.environ.get("EFFNET_CPU_LOCK") or home / "run" / "effnet-cpu.lock")


class CpuGate:
    """An exclusive cross-process lock (flock) held while a CPU worker runs a batch."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    def __enter__(self) -> "CpuGate":
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: Any) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)


def service_name(variant: str) -> str:
    return f"effnet-worker-{variant.lower().replace('_', '-')}"


def make_worker(v: VariantConfig, cfg: ServingConfig, gpu_present: bool) -> Any:
    """The BentoML service class that serves variant `v`."""
    use_gpu = v.gpu > 0 and gpu_present
    threads = variant_threads(v, cfg)
    resources: dict[str, Any] = {"gpu": v.gpu} if use_gpu else {"cpu": str(threads)}

    class Worker:
        def __init__(self) -> None:
            import torch

            self.error: str | None = None
            self.engine = None
            self.manifest = None
            self.device = variant_device(v, use_gpu and torch.cuda.is_available())
            if v.gpu > 0 and self.device == "cpu":
                logger.warning("variant %s asks for %s GPU(s) but CUDA is not present: serving it on the CPU",
                               v.name, v.gpu)
            self.gate = CpuGate(cpu_lock_path()) if self.device == "cpu" else None
            try:
                from engines import load_engine

                # Static-shape engines compile one graph per size and pad a batch up to the next one.
                sizes = v.batch_sizes
                # Loading holds the CPU lock too: `engine: auto` times its candidates while loading,
                # which means nothing if the other workers load (and compile) on the same cores.
                with self.gate or contextlib.nullcontext():
                    self.engine, self.manifest = load_engine(v.model, engine=v.engine, threads=threads,
                                                             device=self.device, batch_sizes=sizes)
                r = self.manifest.resolution
                self._run(np.zeros((1, 3, r, r), np.uint8))  # warm-up: first-call allocations off the request path
                logger.info("variant %s: loaded %s (%s) on %s, %d threads", v.name, v.model,
                            self.engine.describe().get("engine"), self.device, threads)
            except Exception as e:  # CheckpointError, an unknown engine, CUDA failures...
                self.error = f"variant {v.name!r}, checkpoint {v.model!r}: {e}"
                logger.error("effnet worker NOT READY: %s", self.error)
            metrics.VARIANT_READY.labels(v.name).set(0 if self.error else 1)

        def __is_ready__(self) -> bool:
            return self.error is None

        def _run(self, images: np.ndarray) -> tuple[np.ndarray, float]:
            import torch

            x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8))
            with self.gate or contextlib.nullcontext():
                t0 = time.perf_counter()
                scores = torch.softmax(self.engine(x).float(), dim=1).numpy()
                return scores, time.perf_counter() - t0

        @bentoml.api
        def status(self) -> dict:
            info: dict[str, Any] = {"variant": v.name, "model": v.model, "ready": self.error is None,
                                    "error": self.error, "device": self.device, "threads": threads,
                                    "max_batch_size": v.max_batch_size, "max_latency_ms": v.max_latency_ms}
            if self.engine is not None:
                info["engine"] = self.engine.describe()
            return info

        @bentoml.api(batchable=True, max_batch_size=v.max_batch_size, max_latency_ms=v.max_latency_ms)
        def predict(self, images: np.ndarray) -> np.ndarray:
            if self.error is not None:
                raise ServiceUnavailable(self.error)
            scores, seconds = self._run(images)
            metrics.INFERENCE_LATENCY.labels(v.name, self.device).observe(seconds)
            metrics.BATCH_SIZE.labels(v.name).observe(len(images))
            out = np.empty((len(images), scores.shape[1] + 1), np.float32)
            out[:, :-1] = scores
            out[:, -1] = seconds
            return out

    Worker.__name__ = Worker.__qualname__ = f"Worker_{v.name.replace('-', '_')}"
    return bentoml.service(
        name=service_name(v.name),
        resources=resources,
        workers=1,  # one process per variant; its batches are the parallelism
        traffic={"timeout": cfg.server.timeout_s},
        # Gateway -> worker calls are internal; the gateway's access log has every request already,
        # and one log line per call costs CPU that the 2 cores need for inference.
        logging={"access": {"enabled": False}},
    )(Worker)
