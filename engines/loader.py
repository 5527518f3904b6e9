"""`load_engine`: a verified engine for a stored checkpoint, named or chosen by timing (`auto`).

    engine, manifest = load_engine(tag, engine="auto", threads=worker_threads(workers), batch_sizes=(1, 8))

1. The checkpoint is loaded and sha256-verified (`store.load_checkpoint`); the eager model is the
   reference.
2. Each candidate engine is built (exported on first use, cached in the checkpoint's `engines/`
   folder) and verified (`engines.verify`). A failure is logged with its reason and the next
   candidate is tried: for a named engine the chain in `FALLBACK` down to `torch`; for `auto` every
   candidate in `AUTO_CANDIDATES`.
3. `auto` times every verified candidate for a bounded few seconds at the worker's batch sizes and
   keeps the fastest; `describe()` says which engine and precision won, and why.
"""
from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Sequence

import torch

from store import Manifest, load_checkpoint, read_manifest

from .base import BuildContext, Engine, TorchEngine, TorchFp16Engine
from .calibration import load_calibration, load_test_set, test_set_source
from .export import cache_dir, cache_dirs
from .onnxrt import OnnxRuntimeEngine, OnnxRuntimeInt8Engine
from .openvino_rt import OpenVinoBf16Engine, OpenVinoEngine, OpenVinoInt8Engine
from .threads import available_cores, set_threads
from .torch_compile import TorchCompileEngine
from .verify import Reference, Verdict, verify

log = logging.getLogger("engines")

AUTO = "auto"
ENGINES: dict[str, type[Engine]] = {
    e.name: e
    for e in (TorchEngine, TorchFp16Engine, TorchCompileEngine, OnnxRuntimeEngine, OnnxRuntimeInt8Engine, OpenVinoEngine,
              OpenVinoBf16Engine, OpenVinoInt8Engine)
}
# Where a named engine falls back when it cannot run here or fails verification.
FALLBACK = {
    "openvino-bf16": "openvino", "openvino-int8": "openvino", "onnxruntime-int8": "onnxruntime",
    "openvino": "onnxruntime", "onnxruntime": "torch", "torch-compile": "torch", "torch-fp16": "torch",
}
# `auto` leaves torch-compile out on the CPU: its first call costs 41-46 s per batch size, for an engine
# 2x slower than ONNX Runtime there (benchmarks/engines.md). Name it (or pass `candidates=`) to use it.
AUTO_CANDIDATES = ("openvino-bf16", "openvino-int8", "onnxruntime-int8", "openvino", "onnxruntime", "torch")
# On a GPU: torch-compile with CUDA graphs, ONNX Runtime's CUDA/TensorRT providers where the installed
# build has them, fp16 eager, and the fp32 reference; the CPU-only engines would only be refused.
# torch-compile is in here: on a GPU it runs b0 at batch 1 5.4x faster than launch-bound eager, for
# 25-30 s of compilation per batch size at the worker's first start (benchmarks/gpu/README.md).
AUTO_CANDIDATES_GPU = ("torch-compile", "onnxruntime", "torch-fp16", "torch")
AUTO_SECONDS = 6.0  # total timing budget of `auto`, shared by every candidate, batch size and round
AUTO_ROUNDS = 3  # interleaved rounds; each (engine, batch size) keeps its fastest (see time_engines)


def engine_names() -> list[str]:
    return [AUTO, *ENGINES]


def auto_candidates(device: str = "cpu") -> tuple[str, ...]:
    """The engines `auto` considers on this device."""
    return AUTO_CANDIDATES_GPU if device.startswith("cuda") else AUTO_CANDIDATES


class _Checkpoint:
    """The checkpoint, its reference outputs and the calibration data, each loaded at most once."""

    def __init__(self, tag_or_path: str, home: str | None, device: str, threads: int, batch_sizes) -> None:
        self.manifest, self.folder = read_manifest(tag_or_path, home)
        self.model, _ = load_checkpoint(self.folder, device=device)  # sha256-verified
        self.cache = cache_dir(self.folder, self.manifest)
        self.ctx = BuildContext(self.folder, self.manifest, self._fresh_model, threads, device, tuple(batch_sizes))
        self.device = device
        self._ref: Reference | None = None

    def _fresh_model(self) -> torch.nn.Module:
        model, _ = load_checkpoint(self.folder, device=self.device)
        return model

    @property
    def calibration(self):
        if self.ctx.calibration is None:
            self.ctx.calibration = load_calibration(self.folder, self.manifest, self.cache)
        return self.ctx.calibration

    def reference(self) -> Reference:
        if self._ref is None:
            self._ref = Reference(TorchEngine(self.model, self.manifest, self.device), self.calibration,
                                  lambda: load_test_set(self.manifest), test_set_source(self.manifest))
        return self._ref


def _try(name: str, ck: _Checkpoint) -> tuple[Engine | None, Verdict | str]:
    """Build and verify one engine; (engine, verdict) or (None, why not)."""
    cls = ENGINES[name]
    why = cls.unavailable(ck.device)
    if why:
        return None, why
    try:
        if name != "torch":
            _ = ck.calibration  # int8 builds need it; loading it here keeps the error messages uniform
        eng = cls.build(ck.ctx)
    except Exception as e:  # an exporter or runtime failure refuses this engine, not the worker
        log.debug("building %s failed", name, exc_info=True)
        return None, f"build failed: {type(e).__name__}: {e}"
    if name == "torch":
        return eng, Verdict("torch", "fp32", True, "the reference itself")
    v = verify(eng, ck.reference(), ck.cache)
    if not v.ok:
        return None, v
    _record_sidecars(eng)
    return eng, v


def _record_sidecars(eng: Engine) -> None:
    """A verified artefact stored before sizes and hashes were recorded gets its sidecar now, so that
    damage done to it later is found before loading (store/durable.py), not by the runtime's parser."""
    from store.durable import record, sidecar, writable

    for path in eng.artefacts:
        if not sidecar(path).exists() and writable(path.parent):
            try:
                record(path)
            except OSError as e:  # a store that turned read-only meanwhile: it is only not recorded
                log.debug("could not record %s: %s", path, e)


def _why(result: Verdict | str) -> str:
    return result if isinstance(result, str) else result.reason


def _median_per_image(engine: Engine, x: torch.Tensor, seconds: float, min_runs: int = 2) -> float:
    """Median seconds per image of `engine(x)` over about `seconds` (at least `min_runs` calls)."""
    times, deadline = [], time.perf_counter() + seconds
    while len(times) < min_runs or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        engine(x)
        times.append(time.perf_counter() - t0)
        if len(times) >= min_runs and time.perf_counter() > deadline + seconds:  # a very slow engine: stop
            break
    return statistics.median(times) / len(x)


def time_engines(engines: dict[str, Engine], batch_sizes: Sequence[int], manifest: Manifest, seconds: float,
                 rounds: int = AUTO_ROUNDS) -> dict[str, float]:
    """Seconds per image of each engine, averaged over the batch sizes, within about `seconds` in all.

    Interleaved: every round times every engine at every batch size, and each (engine, batch) keeps its
    fastest round: timed one after the other, a passing disturbance decides the winner (benchmarks/
    engines.md). A disturbance only ever slows a slice down, so the fastest round is least touched by it.
    """
    r = manifest.resolution
    inputs = {b: torch.randint(0, 256, (b, 3, r, r), dtype=torch.uint8) for b in batch_sizes}
    for eng in engines.values():
        for x in inputs.values():
            eng(x)  # warm-up: first-call allocations, lazy compilation
    per = seconds / max(1, rounds * len(engines) * len(inputs))
    best: dict[tuple[str, int], float] = {}
    for _ in range(rounds):
        for b, x in inputs.items():
            for name, eng in engines.items():
                t = _median_per_image(eng, x, per)
                best[name, b] = min(t, best.get((name, b), float("inf")))
    return {name: statistics.mean(best[name, b] for b in inputs) for name in engines}


def load_engine(
    tag_or_path: str,
    engine: str = "torch",
    threads: int | None = None,
    device: str = "cpu",
    home: str | None = None,
    batch_sizes: Sequence[int] = (1, 8),
    candidates: Sequence[str] | None = None,
    auto_seconds: float = AUTO_SECONDS,
) -> tuple[Engine, Manifest]:
    """Verify and load a checkpoint, then wrap it in the named engine, or the fastest verified one (`auto`).

    `threads`: this worker's intra-op threads (see `engines.worker_threads`; None: all cores).
    `batch_sizes`: the batch sizes the worker will run (static-shape engines compile one per size;
    `auto` times them). `candidates`: the engines `auto` considers (default `AUTO_CANDIDATES`).
    Raises ValueError for an unknown engine name.
    """
    if engine != AUTO and engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; available: {', '.join(engine_names())}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no GPU is available")
    threads = set_threads(threads or available_cores())
    ck = _Checkpoint(tag_or_path, home, device, threads, sorted(set(batch_sizes)))
    label = f"{ck.manifest.variant} ({ck.folder.name})"
    refused: dict[str, str] = {}

    if engine != AUTO:
        name: str | None = engine
        while name is not None:
            eng, result = _try(name, ck)
            if eng is not None:
                # The first request must not pay for allocation or (torch-compile) compilation.
                eng.warmup(ck.ctx.batch_sizes, ck.manifest.resolution)
                eng.verification = result
                eng.reason = f"{eng.reason}; verified: {_why(result)}"
                if refused:
                    eng.reason += "; requested " + engine + " refused (" + "; ".join(
                        f"{k}: {v}" for k, v in refused.items()) + ")"
                eng.refused = refused
                log.info("%s: serving on %s (%s)", label, name, eng.reason)
                return eng, ck.manifest
            refused[name] = _why(result)
            nxt = FALLBACK.get(name)
            log.warning("%s: engine %s refused: %s; trying %s", label, name, refused[name], nxt)
            name = nxt
        raise RuntimeError(f"{label}: no engine could serve: {refused}")  # torch itself failed

    names = list(candidates or auto_candidates(device))
    for name in names:
        if name not in ENGINES:
            raise ValueError(f"unknown engine {name!r} among candidates")
    key = _auto_key(ck.ctx.batch_sizes, ck.device, names, threads)
    recorded = _recorded_choice(ck, key, label)
    if recorded is not None:
        return recorded, ck.manifest
    built: dict[str, Engine] = {}
    for name in names:
        eng, result = _try(name, ck)
        if eng is None:
            refused[name] = _why(result)
            log.warning("%s: engine %s refused: %s", label, name, refused[name])
            continue
        eng.verification = result
        built[name] = eng
    if not built:
        raise RuntimeError(f"{label}: no engine could serve: {refused}")
    timings = time_engines(built, ck.ctx.batch_sizes, ck.manifest, auto_seconds)
    eng = built.pop(min(timings, key=timings.get))
    built.clear()  # the losers' sessions and compiled models are freed here
    ranking = ", ".join(f"{n} {t * 1e3:.2f}" for n, t in sorted(timings.items(), key=lambda kv: kv[1]))
    eng.reason = (f"auto: fastest verified engine at batch {list(ck.ctx.batch_sizes)} "
                  f"(ms/image: {ranking}); {eng.reason}; verified: {_why(eng.verification)}")
    eng.refused, eng.timings_ms = refused, {n: round(t * 1e3, 3) for n, t in timings.items()}
    _record_choice(ck, key, eng)
    log.info("%s: auto chose %s %s: %s", label, eng.name, eng.precision, eng.reason)
    return eng, ck.manifest


# -- auto's choice, recorded -------------------------------------------------------------------
# The choice is kept next to the artefacts, keyed by everything it depends on, so a restart builds only
# the winner (still verified) instead of timing every candidate again (90 s for four workers on 2 cores).
# `rm engines/<sha>/auto.json`, or any change in the key, makes auto time them again.
AUTO_RECORD = "auto.json"
AUTO_RECORDS_KEPT = 8  # choices kept per checkpoint (thread counts x batch sizes x devices in use)


def _auto_key(batch_sizes: Sequence[int], device: str, names: list[str], threads: int) -> dict:
    from .export import INT8_RECIPE, _version

    try:
        from .openvino_rt import cpu_capabilities

        caps = cpu_capabilities()
    except Exception:  # openvino missing: the CPU's capabilities only matter to its engines
        caps = []
    return {"candidates": names, "batch_sizes": list(batch_sizes), "threads": threads, "device": device,
            "versions": {m: _version(m) for m in ("torch", "onnxruntime", "openvino")}, "cpu": caps,
            "int8_recipe": INT8_RECIPE,  # a new recipe may verify where the old one was refused
            "timing": f"interleaved x{AUTO_ROUNDS}"}  # a choice made by the older, one-after-another timing is redone


def recorded_choice(tag_or_path: str, threads: int | None = None, device: str = "cpu", home: str | None = None,
                    batch_sizes: Sequence[int] = (1, 8), candidates: Sequence[str] | None = None) -> str | None:
    """The engine `load_engine(engine="auto", ...)` with these arguments takes from its record without
    timing anything, or None where it would time the candidates. Reads the manifest and the record only.

    A worker loads in parallel with the others when nothing is timed, and alone when something is
    (the timing means nothing while other workers compile on the same cores).
    """
    manifest, folder = read_manifest(tag_or_path, home)
    names = list(candidates or auto_candidates(device))
    key = _auto_key(sorted(set(batch_sizes)), device, names, threads or available_cores())
    rec = next((r for d in cache_dirs(folder, manifest) for r in _read_records(d) if r.get("key") == key), None)
    return rec.get("engine") if rec is not None and rec.get("engine") in ENGINES else None


def _recorded_choice(ck: _Checkpoint, key: dict, label: str) -> Engine | None:
    # The record beside the weights first (`make engines`), then the state folder's (a read-only store).
    rec = next((r for d in cache_dirs(ck.folder, ck.manifest) for r in _read_records(d) if r.get("key") == key),
               None)
    if rec is None or rec.get("engine") not in ENGINES:
        return None
    if not _cached(rec["engine"], ck):
        stand_in = _stand_in(ck, rec, label)
        if stand_in is not None:
            return stand_in
    eng, result = _try(rec["engine"], ck)
    if eng is None:
        stand_in = _stand_in(ck, rec, label, rebuild=False)
        if stand_in is not None:
            log.warning("%s: auto's recorded choice %s is refused now (%s): serving on %s, its next fastest; "
                        "`make engines` times them again", label, rec["engine"], _why(result), stand_in.name)
            return stand_in
        log.warning("%s: auto's recorded choice %s is refused now (%s): timing every candidate again",
                    label, rec["engine"], _why(result))
        return None
    eng.warmup(ck.ctx.batch_sizes, ck.manifest.resolution)
    eng.verification = result
    eng.timings_ms, eng.refused = rec.get("timings_ms", {}), rec.get("refused", {})
    ranking = ", ".join(f"{n} {t:.2f}" for n, t in sorted(eng.timings_ms.items(), key=lambda kv: kv[1]))
    eng.reason = (f"auto: recorded choice of {rec.get('date')}, fastest verified engine at batch "
                  f"{list(ck.ctx.batch_sizes)} (ms/image: {ranking}); {eng.reason}; verified: {_why(result)}")
    log.info("%s: auto reuses its recorded choice %s %s", label, eng.name, eng.precision)
    return eng


def _cached(name: str, ck: _Checkpoint) -> bool:
    """`Engine.cached`, False where even that cannot be told (the calibration set cannot be read)."""
    try:
        if name != "torch":
            _ = ck.calibration
        return ENGINES[name].cached(ck.ctx)
    except Exception as e:  # noqa: BLE001 - the build that follows reports it properly
        log.debug("cannot tell whether %s is cached: %s", name, e)
        return False


def _stand_in(ck: _Checkpoint, rec: dict, label: str, rebuild: bool = True) -> Engine | None:
    """auto's recorded engine must be built again (its files are damaged or missing): the next fastest
    engine of the record whose files are whole serves at once, and the recorded one is rebuilt in the
    background; `Engine.upgrade` holds its future (service/workers.py swaps it in when done). A worker
    restarted over a damaged cache serves in seconds instead of waiting for a re-export and int8
    calibration (the chaos runs in benchmarks/RESULTS.md: 29 s)."""
    timings = rec.get("timings_ms") or {}
    others = sorted((n for n in timings if n in ENGINES and n != rec["engine"]), key=lambda n: timings[n])
    for name in [*others, *([] if "torch" in others or ck.device != "cpu" else ["torch"])]:
        if not _cached(name, ck):
            continue
        eng, result = _try(name, ck)
        if eng is None:
            continue
        eng.warmup(ck.ctx.batch_sizes, ck.manifest.resolution)
        eng.verification = result
        eng.timings_ms, eng.refused = timings, rec.get("refused", {})
        if not rebuild:
            eng.reason = (f"auto: next fastest of its record, its recorded choice {rec['engine']} being refused now; "
                          f"{eng.reason}; verified: {_why(result)}")
            return eng
        eng.reason = (f"auto: stand-in while its recorded choice {rec['engine']} is rebuilt (its stored files are "
                      f"damaged or missing); {eng.reason}; verified: {_why(result)}")
        eng.upgrade = _rebuild_in_background(rec["engine"], ck, label, timings, rec.get("refused", {}))
        log.warning("%s: auto's recorded choice %s must be rebuilt: serving on %s meanwhile", label, rec["engine"],
                    name)
        return eng
    return None


def _rebuild_in_background(name: str, ck: _Checkpoint, label: str, timings: dict, refused: dict):
    """A Future of the engine `name` rebuilt and verified by a thread at the lowest priority (None if it
    fails): the requests the stand-in serves meanwhile keep the CPU."""
    import os
    import threading
    from concurrent.futures import Future

    done: Future = Future()

    def rebuild() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # this thread, and those it starts
        except (OSError, AttributeError):
            pass
        try:
            t0 = time.perf_counter()
            eng, result = _try(name, ck)
            if eng is None:
                log.error("%s: rebuilding %s failed (%s): the stand-in serves on", label, name, _why(result))
                done.set_result(None)
                return
            eng.warmup(ck.ctx.batch_sizes, ck.manifest.resolution)
            eng.verification, eng.timings_ms, eng.refused = result, timings, refused
            eng.reason = (f"auto: recorded choice, rebuilt in {time.perf_counter() - t0:.0f} s after its stored "
                          f"files were found damaged or missing; {eng.reason}; verified: {_why(result)}")
            log.info("%s: %s rebuilt in %.1f s", label, name, time.perf_counter() - t0)
            done.set_result(eng)
        except BaseException as e:  # noqa: BLE001 - a failed rebuild leaves the stand-in serving
            log.exception("%s: rebuilding %s failed", label, name)
            done.set_exception(e)

    threading.Thread(target=rebuild, name=f"effnet-rebuild-{name}", daemon=True).start()
    return done


def _read_records(cache: Path) -> list[dict]:
    """auto's recorded choices for this checkpoint, newest first: one per key (threads, batch sizes...),
    since a worker loads one engine per thread count its batches may get (service.cpu_slots)."""
    import json

    try:
        data = json.loads((cache / AUTO_RECORD).read_text())
    except (OSError, ValueError):
        return []
    if isinstance(data, dict) and "key" in data:  # a file of one record, the older layout
        return [data]
    recs = data.get("choices") if isinstance(data, dict) else None
    return [r for r in recs if isinstance(r, dict)] if isinstance(recs, list) else []


def _record_choice(ck: _Checkpoint, key: dict, eng: Engine) -> None:
    import json
    import os

    from .export import _locked

    rec = {"key": key, "engine": eng.name, "precision": eng.precision, "timings_ms": eng.timings_ms,
           "refused": eng.refused, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        with _locked(ck.cache):
            keep = [rec] + [r for r in _read_records(ck.cache) if r.get("key") != key][:AUTO_RECORDS_KEPT - 1]
            tmp = ck.cache / f"{AUTO_RECORD}.tmp{os.getpid()}"
            tmp.write_text(json.dumps({"choices": keep}, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, ck.cache / AUTO_RECORD)
    except OSError as e:  # a read-only store still serves; it only times again next start
        log.warning("could not record auto's choice in %s: %s", ck.cache, e)

