"""One BentoML worker service per served variant: a verified checkpoint behind adaptive batching.

Each worker is its own process (`bentoml.depends` from the gateway), built from the configuration at
import time so that every variant gets its own `max_batch_size`/`max_latency_ms` and resources.
- Device: CUDA when the variant asks for GPUs (`gpu: 1` or a fraction) and CUDA is present, with
  `resources={"gpu": ...}`; otherwise the CPU.
- CPU threads: every CPU batch runs while holding core slots (`service.cpu_slots`), one per thread, shared
  by all worker processes of the server: at most `cpu_threads` inference threads run at any time, however
  many variants are served. A batch takes all of its `threads` when every slot is free (a lone request
  gets the whole machine) and one when the machine is busy, so `workers: 2` processes of one variant run
  two single-thread batches side by side. The worker therefore loads its engine once per thread count it
  may use: 1 and `threads`.
- A checkpoint that is missing, corrupted or mismatched does not crash the process (a crash would be
  restarted in a loop): the worker logs the checkpoint and the problem, reports them through
  `status`, stays not ready, and refuses `predict` with 503.
- `predict` takes uint8 (N, 3, R, R) already cropped by the gateway and returns float32 (N, K + 1):
  the K softmax scores, then the seconds its batch took, from which the gateway derives queue wait.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
from bentoml.exceptions import ServiceUnavailable

from . import metrics
from .config import (ServingConfig, VariantConfig, cpu_threads, tracing_options, variant_device, variant_thread_counts,
                     variant_threads)
from .cpu_slots import CoreSlots

logger = logging.getLogger("effnet.worker")


def dispatch_without_learned_wait() -> bool:
    """Make BentoML's adaptive batcher send a batch as soon as the worker is free, never holding a
    request back for batch-mates by the wait it learned. Returns whether the patch applied.

    NOTE: the batcher (bentoml._internal.marshal.dispatcher, 1.4.30) learns `wait`, the mean time its
    last 50 batches waited, and holds new requests back while `n * (age + 1 ms + per-item time)` is
    below it. The wait it measures is the wait it imposes, so after a burst it kept holding lone
    requests back: lite0 at concurrency 1 answered in 15.9 ms before 32 clients had loaded it for
    12 s and in 116 ms right after (2026-11-27 17:13); it took minutes of low traffic to unlearn.
    Batches still form here: requests that arrive while a batch runs go together in the next one,
    and the gateway already sends what waited for it as one call (service/coalesce.py). The load
    shedding (503 when max_latency_ms cannot be met) is unchanged.
    """
    try:
        from bentoml._internal.marshal.dispatcher import Optimizer
    except ImportError:  # another BentoML layout: keep its behaviour, say so
        logger.warning("BentoML's batcher was not found where 1.4.30 keeps it: its learned wait stays on")
        return False
    if getattr(Optimizer.trigger_refresh, "_effnet_no_wait", False):
        return True
    learn = Optimizer.trigger_refresh

    def trigger_refresh(self) -> None:
        learn(self)  # keeps the per-item time estimates that the load shedding uses
        self.wait = 0

    trigger_refresh._effnet_no_wait = True
    Optimizer.trigger_refresh = trigger_refresh
    return True


dispatch_without_learned_wait()


def ready_dir(variant: str) -> Path:
    """One marker file per loaded process of a variant (`workers` > 1 means several processes)."""
    home = Path(os.environ.get("BENTOML_HOME") or Path.home() / "bentoml")
    return home / "run" / "ready" / variant


def live_markers(folder: Path) -> int:
    """Loaded processes of a variant that are still alive; markers of dead ones are removed."""
    n = 0
    for f in folder.glob("*"):
        try:
            os.kill(int(f.name), 0)
            n += 1
        except (ValueError, ProcessLookupError):
            f.unlink(missing_ok=True)
        except PermissionError:  # alive, someone else's
            n += 1
    return n


def loading_slots(slots: CoreSlots | None, v: VariantConfig, device: str, sizes, threads: int):
    """The core slots a worker holds while it loads: every one where `auto` will time its candidates
    (timing means nothing while other workers compile on the same cores), else one, so that workers
    compile side by side, as many at once as there are slots.

    NOTE: holding every slot for every load made the default five processes load one after another:
    24 of a start's 61 s (2026-11-27 10:58), with one of the two cores idle. A load's warm-up runs its
    multi-thread engine once per batch size while holding one slot; that is before the server is ready.
    """
    if slots is None:
        return contextlib.nullcontext()
    if v.engine == "auto":
        from engines.loader import recorded_choice

        if recorded_choice(v.model, threads=threads, device=device, batch_sizes=sizes) is None:
            return slots.hold_all()
    return slots.hold(1)


class DeviceThread:
    """Runs every engine call of a GPU worker (load, warm-up, inference) on one thread of its own.

    NOTE: PyTorch keeps cuDNN's benchmarked execution plans in thread_local caches (Conv_v8.cpp: plans
    are not thread-safe across engines), and torch.compile's CUDA graph trees are per thread as well.
    BentoML runs a sync API in a pool of threads, so a warm-up in the loading thread warmed nothing
    for them: each new (thread, batch size) pair benchmarked every convolution again. On the H200 that
    was the multi-second stalls at 16 clients (3.2 s apart) and the 3.6 s first request that padding
    to fixed batch sizes had not removed (benchmarks/gpu/README.md). On the CPU, calls run in place.
    """

    def __init__(self, device: str, name: str = "effnet-device") -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.pool = None if device == "cpu" else ThreadPoolExecutor(1, thread_name_prefix=name)

    def __call__(self, fn, *args, **kwargs):
        if self.pool is None:
            return fn(*args, **kwargs)
        return self.pool.submit(fn, *args, **kwargs).result()


def service_name(variant: str) -> str:
    return f"effnet-worker-{variant.lower().replace('_', '-')}"


class VariantRunner:
    """One loaded copy of a variant's engines and what it takes to run a batch on them: the body of a
    worker process, and of each in-process stream (`placement: gateway`, service/inprocess.py).

    A checkpoint that is missing, corrupted or mismatched leaves `error` set instead of raising.
    `predict` is not reentrant: one batch at a time per runner (OpenVINO's infer requests are shared).
    """

    def __init__(self, v: VariantConfig, cfg: ServingConfig, use_gpu: bool) -> None:
        self.v = v
        self.error: str | None = None
        self.engine = None
        self.manifest = None
        self.device = variant_device(v, use_gpu)
        if v.gpu > 0 and self.device == "cpu":
            logger.warning("variant %s asks for %s GPU(s) but CUDA is not present: serving it on the CPU",
                           v.name, v.gpu)
        self.slots = CoreSlots(cpu_threads(cfg)) if self.device == "cpu" else None
        self.on_device = DeviceThread(self.device, f"effnet-{v.name}-{self.device}")
        self.engines: dict[int, Any] = {}
        try:
            from engines import load_engine

            # Static-shape engines compile one graph per size and pad a batch up to the next one.
            sizes = v.batch_sizes
            # NOTE: the engine is chosen once, at the variant's full thread count (`auto` times
            # there; `make engines` records it), and the single-thread batches run the same engine
            # with one thread: no second timing at start-up, and one engine to compare offline.
            counts = variant_thread_counts(v, cfg, self.device)
            with loading_slots(self.slots, v, self.device, sizes, counts[0]):
                name = v.engine
                for n in counts:
                    self.engines[n], self.manifest = self.on_device(
                        load_engine, v.model, engine=name, threads=n, device=self.device, batch_sizes=sizes)
                    name = self.engines[n].name
                    r = self.manifest.resolution
                    # first-call allocations, off the request path
                    self.on_device(self._infer, np.zeros((1, 3, r, r), np.uint8), n)
            self.engine = self.engines[max(self.engines)]
            logger.info("variant %s: loaded %s on %s (%s), %s threads per batch", v.name, v.model, self.device,
                        ", ".join(f"{n} thread(s): {e.describe().get('engine')}" for n, e in self.engines.items()),
                        " or ".join(map(str, self.engines)))
        except Exception as e:  # CheckpointError, an unknown engine, CUDA failures...
            self.error = f"variant {v.name!r}, checkpoint {v.model!r}: {e}"
            logger.error("effnet variant NOT READY: %s", self.error)

    def _infer(self, images: np.ndarray, n: int) -> np.ndarray:
        import torch

        # The torch engines read the process-wide count; ONNX Runtime and OpenVINO were given theirs.
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8))
        return torch.softmax(self.engines[n](x).float(), dim=1).numpy()

    def _run(self, images: np.ndarray) -> tuple[np.ndarray, float, int]:
        if self.slots is None:  # GPU: the device serialises its own work, on the thread that warmed it
            t0 = time.perf_counter()
            n = max(self.engines)
            return self.on_device(self._infer, images, n), time.perf_counter() - t0, n
        with self.slots.hold(max(self.engines)) as got:
            n = max(k for k in self.engines if k <= got)
            t0 = time.perf_counter()
            scores = self._infer(images, n)
            return scores, time.perf_counter() - t0, n

    def predict(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, 3, R, R) -> float32 (N, K + 1): softmax scores, then the batch's inference seconds."""
        if self.error is not None:
            raise ServiceUnavailable(self.error)
        scores, seconds, n = self._run(images)
        metrics.INFERENCE_LATENCY.labels(self.v.name, self.device).observe(seconds)
        metrics.BATCH_THREADS.labels(self.v.name, str(n)).inc()
        metrics.BATCH_SIZE.labels(self.v.name).observe(len(images))
        out = np.empty((len(images), scores.shape[1] + 1), np.float32)
        out[:, :-1] = scores
        out[:, -1] = seconds
        return out

    def status(self, threads: int, loaded: int, wanted: int, placement: str = "worker") -> dict:
        """What `/variants` shows of this variant: ready once `loaded` of the `wanted` processes or
        streams have loaded (one on a GPU, whatever `workers` says)."""
        v = self.v
        info: dict[str, Any] = {
            "variant": v.name, "model": v.model, "error": self.error, "device": self.device,
            "threads": threads, "workers": wanted, "workers_loaded": loaded, "placement": placement,
            "ready": self.error is None and loaded >= wanted,
            "max_batch_size": v.max_batch_size, "max_latency_ms": v.max_latency_ms,
        }
        if self.error is None and loaded < wanted:
            info["error"] = f"variant {v.name!r}: {loaded} of {wanted} worker processes loaded"
        if self.engine is not None:
            info["engine"] = self.engine.describe()
            if len(self.engines) > 1:
                info["engines_by_threads"] = {str(n): e.describe().get("engine") for n, e in self.engines.items()}
        return info


def make_worker(v: VariantConfig, cfg: ServingConfig, gpu_present: bool) -> Any:
    """The BentoML service class that serves variant `v`."""
    use_gpu = v.gpu > 0 and gpu_present
    processes = 1 if use_gpu else v.workers  # one process holds the GPU (see `workers=` below)
    threads = variant_threads(v, cfg)
    resources: dict[str, Any] = {"gpu": v.gpu} if use_gpu else {"cpu": str(threads)}

    class Worker:
        def __init__(self) -> None:
            import torch

            self.runner = VariantRunner(v, cfg, use_gpu and torch.cuda.is_available())
            if self.runner.error is None:
                self.marker = ready_dir(v.name) / str(os.getpid())
                self.marker.parent.mkdir(parents=True, exist_ok=True)
                self.marker.touch()
            metrics.VARIANT_READY.labels(v.name).set(0 if self.runner.error else 1)

        def __is_ready__(self) -> bool:
            return self.runner.error is None

        @bentoml.api
        def status(self) -> dict:
            loaded = live_markers(ready_dir(v.name)) if self.runner.error is None else 0
            return self.runner.status(threads, loaded, processes)

        @bentoml.api(batchable=True, max_batch_size=v.max_batch_size, max_latency_ms=v.max_latency_ms)
        def predict(self, images: np.ndarray) -> np.ndarray:
            return self.runner.predict(images)

    Worker.__name__ = Worker.__qualname__ = f"Worker_{v.name.replace('-', '_')}"
    return bentoml.service(
        name=service_name(v.name),
        resources=resources,
        # Processes of this variant, each with its own batcher; on the CPU they share the core slots.
        workers=processes,
        traffic={"timeout": cfg.server.timeout_s},
        # Gateway -> worker calls are internal; the gateway's access log has every request already,
        # and one log line per call costs CPU that the 2 cores need for inference.
        logging={"access": {"enabled": False}},
        tracing=tracing_options(cfg.server),
    )(Worker)
