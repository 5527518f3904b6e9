"""One BentoML worker service per served variant: a verified checkpoint behind adaptive batching.

Each worker is its own process (`bentoml.depends` from the gateway), built from the configuration at
import time so that every variant gets its own `max_batch_size`/`max_latency_ms` and resources. A variant
with `workers: N` on the CPU is N services of one process each (replicas), not one service of N
processes, so that the gateway chooses which process each call goes to (`worker_names`).
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
- `predict` takes uint8 (N, 3, R, R) already cropped by the gateway and answers one record per image
  (`service.results.InferenceResult.to_records`: the softmax scores, the seconds its batch took, the
  engine). `predict_shared` answers the same for references to a batch the gateway wrote into shared
  memory (`worker_transport: shared_memory`, service/shm.py); both are batchable, with the same limits.
"""
from __future__ import annotations

import base64
import contextlib
import logging
import os
import time
from typing import Any

import bentoml
import numpy as np
from bentoml.exceptions import BadInput, InternalServerError, NotFound, ServiceUnavailable

from . import metrics
from .config import (ServingConfig, VariantConfig, cpu_threads, tracing_options, variant_device, variant_thread_counts,
                     variant_threads)
from .cpu_slots import CoreSlots
from .health import net_namespace, pid_namespace
from .heap import freeze_startup_heap, watch_collector
from .priority import lower_priority
from .results import InferenceResult
from .shm import ArenaMissing, ArenaReader, StaleBatch

logger = logging.getLogger("effnet.worker")


def dispatch_without_learned_wait() -> bool:
    """Make BentoML's adaptive batcher send a batch as soon as the worker is free, never holding a
    request back for batch-mates by the wait it learned. Returns whether the patch applied.

    The batcher (bentoml._internal.marshal.dispatcher, 1.4.30) learns `wait`, the mean time its last
    50 batches waited, and holds new requests back while `n * (age + 1 ms + per-item time)` is below
    it: the wait it measures is the wait it imposes, so after a burst lone requests stay slow for
    minutes (lite0 at 1 client: 16 ms before a burst, 116 ms after; benchmarks/serving.md). Batches
    still form: what arrives while a batch runs goes in the next one, and the gateway already sends
    what waited as one call (service/coalesce.py). The load shedding is unchanged.
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


def cache_media_types() -> bool:
    """Work out each API's response media type once, not at every response. Returns whether it applied.

    BentoML 1.4.30 (`_bentoml_sdk.io_models.IOMixin.mime_type`) builds the pydantic JSON schema of an
    API's return type for every response, to tell JSON from text or files: 93 us of worker CPU per
    call against about 1 ms of HTTP work (benchmarks/serving.md). The answer depends on the class alone.
    """
    try:
        from _bentoml_sdk.io_models import IOMixin
    except ImportError:
        logger.warning("BentoML's IOMixin was not found where 1.4.30 keeps it: media types are not cached")
        return False
    if getattr(IOMixin.mime_type, "_effnet_cached", False):
        return True
    derive, known = IOMixin.mime_type.__func__, {}

    def mime_type(cls) -> str:
        if cls not in known:
            known[cls] = derive(cls)
        return known[cls]

    mime_type._effnet_cached = True
    IOMixin.mime_type = classmethod(mime_type)
    return True


dispatch_without_learned_wait()
cache_media_types()


def loading_slots(slots: CoreSlots | None, v: VariantConfig, device: str, sizes, threads: int):
    """The core slots a worker holds while it loads: every one where `auto` will time its candidates
    (timing means nothing while other workers compile on the same cores), else one, so that workers
    compile side by side, as many at once as there are slots.

    Holding every slot for every load makes the processes load one after another (24 of a 61 s start,
    benchmarks/serving.md). A warm-up runs its multi-thread engine holding one slot, before readiness.
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

    PyTorch keeps cuDNN's benchmarked plans and torch.compile's CUDA graph trees per thread, and
    BentoML runs a sync API in a pool of threads: a warm-up elsewhere warms nothing, and each new
    (thread, batch size) pair benchmarks every convolution again, which stalls requests for seconds
    (benchmarks/gpu/README.md). On the CPU, calls run in place.
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


def worker_replicas(v: VariantConfig, gpu_present: bool) -> int:
    """Worker processes of a variant: `workers` on the CPU, one on a GPU (it holds the device)."""
    return 1 if v.gpu > 0 and gpu_present else v.workers


def worker_names(v: VariantConfig, gpu_present: bool) -> list[str]:
    """One BentoML service name per worker process of `v`: `effnet-worker-<variant>` alone, else
    `effnet-worker-<variant>-1`, `-2`, ...

    One service of N processes (BentoML's `workers=N`) shares one socket, and whichever process accepts
    a pooled connection first gets its calls: a start can leave one process idle (127 against 191 req/s,
    benchmarks/serving.md). One service per process gives each its own socket, and the gateway sends
    each call to the replica with the fewest calls in flight.
    """
    n = worker_replicas(v, gpu_present)
    return [service_name(v.name)] if n == 1 else [f"{service_name(v.name)}-{i}" for i in range(1, n + 1)]


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
        self.arenas = ArenaReader(v.name)  # maps the gateway's shared-memory batches on first use
        try:
            from engines import load_engine

            # Static-shape engines compile one graph per size and pad a batch up to the next one.
            sizes = v.batch_sizes
            # The engine is chosen once, at the full thread count (`auto` times there; `make engines`
            # records it); single-thread batches run the same engine with one thread.
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
        up = getattr(self.engines[n], "upgrade", None)
        if up is not None and up.done():
            self._upgrade(n)
        # the manifest's temperature makes the scores calibrated probabilities; the top-1 is the same
        return torch.softmax(self.engines[n](x).float() / self.manifest.temperature, dim=1).numpy()

    def _upgrade(self, n: int) -> None:
        """A stand-in engine's rebuilt successor is ready (engines.loader): it serves from this batch on."""
        old = self.engines[n]
        up, old.upgrade = old.upgrade, None
        new = None if up.exception() is not None else up.result()
        if new is None:
            return  # logged by the rebuild; the stand-in serves on
        self.engines[n] = new
        if self.engine is old:
            self.engine = new
        logger.info("variant %s: %s rebuilt, serving on it instead of the stand-in %s (%s threads)", self.v.name,
                    new.name, old.name, n)

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

    def run(self, images: np.ndarray) -> InferenceResult:
        """uint8 (N, 3, R, R) -> softmax scores, with the batch's inference seconds and engine."""
        if self.error is not None:
            raise ServiceUnavailable(self.error)
        scores, seconds, n = self._run(images)
        metrics.INFERENCE_LATENCY.labels(self.v.name, self.device).observe(seconds)
        metrics.BATCH_THREADS.labels(self.v.name, str(n)).inc()
        metrics.BATCH_SIZE.labels(self.v.name).observe(len(images))
        return InferenceResult(scores, seconds, engine=getattr(self.engines[n], "name", ""))

    def predict(self, images: np.ndarray) -> np.ndarray:
        """`run` as the worker API answers it: one record per image (InferenceResult.to_records)."""
        return self.run(images).to_records()

    def predict_shared(self, refs: np.ndarray) -> np.ndarray:
        """`predict` for the batch that `refs` name in the gateway's shared memory (service/shm.py)."""
        return self.predict_refs(refs).to_records()

    def predict_refs(self, refs: np.ndarray) -> InferenceResult:
        """`run` on the batch that `refs` name in the gateway's shared memory, checked before and after."""
        if self.error is not None:
            raise ServiceUnavailable(self.error)
        try:
            images, verify = self.arenas.gather(refs)
        except ArenaMissing as e:  # 404: the gateway sends this variant's batches in the body instead
            raise NotFound(str(e)) from None
        except StaleBatch as e:  # only for a call the gateway gave up on: nobody waits for this answer
            raise InternalServerError(str(e)) from None
        except ValueError as e:
            raise BadInput(f"bad shared-memory references: {e}") from None
        out = self.run(images)
        try:
            verify()
        except StaleBatch as e:
            raise InternalServerError(str(e)) from None
        return out

    def predict_wire(self, shape: list[int], pixels: str = "", refs: list[list[int]] | None = None) -> dict:
        """`predict` (pixels: base64 uint8 of `shape`) or `predict_shared` (refs) in JSON, for a gateway that
        reaches this worker across the network (InferenceResult.to_wire)."""
        if self.error is not None:
            raise ServiceUnavailable(self.error)
        if refs is not None:
            return self.predict_refs(np.asarray(refs, dtype=np.int64)).to_wire()
        try:
            images = np.frombuffer(base64.b64decode(pixels, validate=True), np.uint8).reshape(shape)
        except (ValueError, TypeError) as e:
            raise BadInput(f"bad pixels: expected base64 uint8 of shape {shape}: {e}") from None
        if images.ndim != 4:
            raise BadInput(f"bad pixels: expected a batch (N, C, H, W), got shape {shape}")
        return self.run(images).to_wire()

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


def make_workers(v: VariantConfig, cfg: ServingConfig, gpu_present: bool) -> list[Any]:
    """The BentoML service classes that serve variant `v`, one per worker process (`worker_names`)."""
    return [make_worker(v, cfg, gpu_present, name) for name in worker_names(v, gpu_present)]


def make_worker(v: VariantConfig, cfg: ServingConfig, gpu_present: bool, name: str) -> Any:
    """One BentoML service (one process) that serves variant `v`."""
    use_gpu = v.gpu > 0 and gpu_present
    threads = variant_threads(v, cfg)
    resources: dict[str, Any] = {"gpu": v.gpu} if use_gpu else {"cpu": str(threads)}

    class Worker:
        def __init__(self) -> None:
            import torch

            lower_priority(cfg.server.worker_nice)  # service/priority.py: the gateway keeps its CPU
            watch_collector(name, v.name)
            self.runner = VariantRunner(v, cfg, use_gpu and torch.cuda.is_available())
            metrics.VARIANT_READY.labels(v.name).set(0 if self.runner.error else 1)
            freeze_startup_heap(name, v.name)  # service/heap.py

        def __is_ready__(self) -> bool:
            return self.runner.error is None

        @bentoml.api
        async def status(self) -> dict:
            """This process's status, with its process id: the gateway's health checks call it and watch the
            process's exit (service/health.py). On the event loop, not in the threads that run batches: a
            batch waiting for a core slot that a stopped process holds must not make this one look hung."""
            return {**self.runner.status(threads, int(self.runner.error is None), 1), "pid": os.getpid(),
                    "pid_namespace": pid_namespace(), "net_namespace": net_namespace()}

        @bentoml.api(batchable=True, max_batch_size=v.max_batch_size, max_latency_ms=v.max_latency_ms)
        def predict(self, images: np.ndarray) -> np.ndarray:
            """uint8 (N, 3, R, R) -> one record per image (service.results.InferenceResult.to_records)."""
            return self.runner.predict(images)

        @bentoml.api(batchable=True, max_batch_size=v.max_batch_size, max_latency_ms=v.max_latency_ms)
        def predict_shared(self, refs: np.ndarray) -> np.ndarray:
            """int64 (N, 5) references to images in the gateway's shared memory -> as `predict`."""
            return self.runner.predict_shared(refs)

        @bentoml.api
        def predict_wire(self, shape: list[int], pixels: str = "", refs: list[list[int]] | None = None) -> dict:
            """`predict` or `predict_shared` in JSON, for a gateway elsewhere (`workers_at`): BentoML takes no
            pickle from the network. Not batchable: the gateway sends what waited as one call already."""
            return self.runner.predict_wire(shape, pixels, refs)

    Worker.__name__ = Worker.__qualname__ = "Worker_" + name.removeprefix("effnet-worker-").replace("-", "_")
    return bentoml.service(
        name=name,
        resources=resources,
        # One process per service (see worker_names); on the CPU, the replicas share the core slots.
        workers=1,
        traffic={"timeout": cfg.server.timeout_s},
        # Gateway -> worker calls are internal; the gateway's access log has every request already,
        # and one log line per call costs CPU that the 2 cores need for inference.
        logging={"access": {"enabled": False}},
        tracing=tracing_options(cfg.server),
    )(Worker)
