"""Engines prepared ahead of serving, so that a worker's first start only loads what was chosen.

`export_and_verify` exports one checkpoint for the named engines and verifies each against the eager
reference (`effnet export`); `choose` lets one served variant's engine setting pick its engine with the
worker's own threads, device and batch sizes, which records auto's choice next to the checkpoint;
`unprepared` says, from manifests and records alone, what is still to be done (`effnet serve --check`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from .export import cache_dir
from .loader import AUTO, ENGINES, _Checkpoint, _try, _why, auto_candidates, load_engine, recorded_choice
from .threads import set_threads
from .verify import read_records


@dataclass(frozen=True)
class VariantEngine:
    """One served variant's engine, as its worker will load it."""
    name: str  # the served variant
    model: str  # checkpoint tag
    engine: str  # an engine name or auto
    device: str
    threads: int
    batch_sizes: tuple[int, ...]


@dataclass(frozen=True)
class EngineCheck:
    """The verdict on one engine of one checkpoint."""
    engine: str
    ok: bool
    precision: str
    reason: str
    metrics: dict = field(default_factory=dict)  # max_abs_diff, agreement, test_top1, test_top1_reference

    def to_dict(self) -> dict:
        return {"engine": self.engine, "ok": self.ok, "reason": self.reason, "precision": self.precision,
                **self.metrics}


@dataclass(frozen=True)
class ExportReport:
    checkpoint: str  # the checkpoint's folder
    variant: str
    cache: str  # where the artefacts and verdicts are kept
    calibration: str  # the source of the calibration images
    engines: list[EngineCheck]

    @property
    def all_failed(self) -> bool:
        return all(not e.ok for e in self.engines)

    def to_dict(self) -> dict:
        return {"checkpoint": self.checkpoint, "cache": self.cache, "calibration": self.calibration,
                "engines": [e.to_dict() for e in self.engines]}


def engine_selection(text: str, device: str) -> list[str]:
    """Engine names from a comma-separated list, 'all' (every engine but the eager reference) or 'auto'
    (what engine: auto considers on `device`). Raises ValueError for an unknown name."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return [n for n in ENGINES if n != "torch"]
    if names == ["auto"]:
        return [n for n in auto_candidates(device) if n != "torch"]
    unknown = [n for n in names if n not in ENGINES]
    if unknown:
        raise ValueError(f"unknown engine {unknown[0]!r}; available: all, auto, {', '.join(ENGINES)}")
    return names


def export_and_verify(tag: str, engines: list[str], device: str = "cpu", threads: int | None = None,
                      batch_sizes: list[int] | tuple[int, ...] = (1, 8), home: str | None = None) -> ExportReport:
    """Export checkpoint `tag` for `engines`, verify each against the eager reference and cache the
    artefacts and verdicts in the checkpoint's engines/ folder."""
    ck = _Checkpoint(tag, home, device, set_threads(threads), sorted(set(batch_sizes)))
    checks = []
    for name in engines:
        eng, result = _try(name, ck)
        if isinstance(result, str):
            checks.append(EngineCheck(name, eng is not None, ENGINES[name].precision, _why(result)))
        else:
            metrics = {k: result.metrics.get(k) for k in ("max_abs_diff", "agreement", "test_top1",
                                                         "test_top1_reference")}
            checks.append(EngineCheck(name, eng is not None, result.precision, _why(result), metrics))
    return ExportReport(str(ck.folder), ck.manifest.variant, str(cache_dir(ck.folder, ck.manifest)),
                        ck.calibration.source, checks)


@dataclass(frozen=True)
class Choice:
    variant: VariantEngine
    description: dict  # the engine's describe(): engine, precision, reason, refused
    seconds: float


def choose(v: VariantEngine) -> Choice:
    """Load `v`'s engine as its worker will; for auto this times the candidates and records the winner.
    Raises what load_engine raises (a missing checkpoint, no engine at all)."""
    t0 = time.perf_counter()
    eng, _ = load_engine(v.model, engine=v.engine, threads=v.threads, device=v.device, batch_sizes=v.batch_sizes)
    return Choice(v, eng.describe(), time.perf_counter() - t0)


def unprepared(variants: list[VariantEngine]) -> list[str]:
    """What is still to be done before these engines load without exporting or timing, one line per
    variant (empty: every checkpoint is stored and every engine choice recorded or engine verified).
    Reads manifests and records only, so it answers in a few seconds."""
    from store import CheckpointError, read_manifest

    todo = []
    for v in variants:
        try:
            manifest, folder = read_manifest(v.model)
        except CheckpointError as e:
            todo.append(f"variant {v.name!r}: {e}")
            continue
        if v.engine == AUTO:
            if recorded_choice(v.model, threads=v.threads, device=v.device, batch_sizes=v.batch_sizes) is None:
                todo.append(f"variant {v.name!r}: engine auto has not chosen for {v.device}, {v.threads} thread(s), "
                            f"batch sizes {list(v.batch_sizes)}")
        elif v.engine != "torch" and v.engine not in read_records(cache_dir(folder, manifest)):
            todo.append(f"variant {v.name!r}: engine {v.engine} is not exported and verified yet")
    return todo
