"""Verification: an engine serves only if it gives the reference's answers.

- fp32 engines: logits within `FP32_TOLERANCE` of the eager reference on a fixed calibration batch;
- bf16 and int8 engines: top-1 agreement with the reference of at least `MIN_AGREEMENT` on the
  calibration set, and a top-1 drop of at most `MAX_TOP1_DROP` on the test set where one is
  available offline (Fashion-MNIST).
Every result, pass or fail, is recorded in `verification.json` in the checkpoint's engines folder,
keyed by engine, and reused while the artefacts' sha256, the runtime versions, the CPU's
capabilities and the calibration data are unchanged.

The record is not in the manifest: the manifest belongs to the trainer and is written once with the
weights, while engines are exported later, by several workers at once, and per machine (bf16 depends
on the CPU). A file next to the artefacts it describes is safe to update concurrently (lock + rename).
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .base import Engine
from .calibration import VERIFY_BATCH, CalibrationSet
from .export import _locked, _version, sha256_of

log = logging.getLogger(__name__)

RECORD_FILE = "verification.json"
VERIFY_VERSION = 1  # bump when the checks below change, so old records are not trusted
# NOTE: "within 1e-3" read as max |engine - reference| <= 1e-3 x max(1, max |reference|): absolute for
# the small logits of a fresh model, relative for the large logits of a trained one, where fp32
# reassociation alone moves the last digits.
FP32_TOLERANCE = 1e-3
MIN_AGREEMENT = 0.99
MAX_TOP1_DROP = 0.005  # 0.5 points


class Reference:
    """The eager reference's outputs, computed on first use (a restart whose records all hold never
    runs it) and shared by every candidate engine."""

    def __init__(self, reference: Engine, calibration: CalibrationSet,
                 test: CalibrationSet | Callable[[], CalibrationSet | None] | None, test_source: str | None = None) -> None:
        """`test`: the test set, or a function that loads it on first use, then with its `test_source`.
        Lazily, because a restart's recorded verdicts need only the test set's name: loading
        Fashion-MNIST's 10,000 test images (and torchvision, to resize them) costs a worker ~3 s."""
        self.engine, self.calibration = reference, calibration
        if callable(test):
            self._load_test, self._test, self.test_source = test, None, test_source
        else:
            self._load_test, self._test = None, test
            self.test_source = test.source if test is not None else None
        self._calib_logits: torch.Tensor | None = None
        self._test_pred: torch.Tensor | None = None

    @property
    def test(self) -> CalibrationSet | None:
        if self._load_test is not None:
            self._test, self._load_test = self._load_test(), None
        return self._test

    @property
    def calib_logits(self) -> torch.Tensor:
        if self._calib_logits is None:
            self._calib_logits = run_batched(self.engine, self.calibration.images)
        return self._calib_logits

    @property
    def test_pred(self) -> torch.Tensor | None:
        if self._test_pred is None and self.test is not None:
            self._test_pred = run_batched(self.engine, self.test.images, 256).argmax(1)
        return self._test_pred

    @property
    def test_top1(self) -> float | None:
        if self.test is None or self.test.labels is None:
            return None
        return (self.test_pred == self.test.labels).float().mean().item()


@dataclass
class Verdict:
    engine: str
    precision: str
    ok: bool
    reason: str
    metrics: dict[str, Any] = field(default_factory=dict)
    key: dict[str, Any] = field(default_factory=dict)
    date: str = ""


def run_batched(engine, images: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    return torch.cat([engine(images[i:i + chunk]) for i in range(0, len(images), chunk)])


def record_key(engine: Engine, ref: Reference) -> dict[str, Any]:
    """What a verification result depends on; a record is reused only if all of it is unchanged."""
    from .openvino_rt import cpu_capabilities

    key = {
        "verify_version": VERIFY_VERSION,
        "engine": engine.name,
        "precision": engine.precision,
        "artefacts_sha256": sha256_of(*engine.artefacts) if engine.artefacts else None,
        "versions": {m: _version(m) for m in ("torch", "onnxruntime", "openvino")},
        "calibration": ref.calibration.source,
        "test_set": ref.test_source,
    }
    if engine.runtime == "openvino":
        key["cpu"] = cpu_capabilities()
    return key


def check(engine: Engine, ref: Reference) -> Verdict:
    """Run the checks (no cache)."""
    calib = ref.calibration
    m: dict[str, Any] = {"calibration_images": len(calib.images)}
    fixed = calib.images[:VERIFY_BATCH]
    out = run_batched(engine, fixed)
    want = ref.calib_logits[:VERIFY_BATCH]
    if out.shape != want.shape:
        return Verdict(engine.name, engine.precision, False, f"output shape {tuple(out.shape)} != {tuple(want.shape)}", m)
    diff = (out.float() - want).abs().max().item()
    scale = max(1.0, want.abs().max().item())
    m["max_abs_diff"] = diff
    m["relative_diff"] = diff / scale
    logits = run_batched(engine, calib.images)
    m["agreement"] = (logits.argmax(1) == ref.calib_logits.argmax(1)).float().mean().item()
    failed_agreement = engine.precision != "fp32" and m["agreement"] < MIN_AGREEMENT
    # A reduced-precision engine that already failed on agreement is refused whatever its test top-1:
    # skip the 10k test images (most of `make engines` for an int8 model that fails).
    if ref.test is not None and ref.test.labels is not None and not failed_agreement:
        pred = run_batched(engine, ref.test.images, 256).argmax(1)
        m["test_top1"] = (pred == ref.test.labels).float().mean().item()
        m["test_top1_reference"] = ref.test_top1
        m["test_images"] = len(ref.test.images)
    if not torch.isfinite(out).all():
        return Verdict(engine.name, engine.precision, False, "non-finite logits", m)
    if engine.precision == "fp32":
        ok = diff <= FP32_TOLERANCE * scale
        reason = (f"fp32 logits within {diff:.2e} of the reference on {len(fixed)} fixed images "
                  f"(limit {FP32_TOLERANCE * scale:.2e})")
        if not ok:
            reason = reason.replace("within", "differ by", 1)
        return Verdict(engine.name, engine.precision, ok, reason, m)
    reasons, ok = [], True
    agree = m["agreement"]
    ok &= agree >= MIN_AGREEMENT
    reasons.append(f"top-1 agreement {agree:.2%} on {len(calib.images)} calibration images (min {MIN_AGREEMENT:.0%})")
    if "test_top1" in m:
        drop = m["test_top1_reference"] - m["test_top1"]
        ok &= drop <= MAX_TOP1_DROP
        reasons.append(f"test top-1 {m['test_top1']:.2%} vs reference {m['test_top1_reference']:.2%} "
                       f"(drop {drop * 100:+.2f} points, max {MAX_TOP1_DROP * 100:.1f})")
    elif ref.test is None or ref.test.labels is None:
        reasons.append("no test set available offline")
    if not calib.real:
        reasons.append("calibration set is synthetic noise: a weaker check")
    return Verdict(engine.name, engine.precision, ok, "; ".join(reasons), m)


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def verify(engine: Engine, ref: Reference, cache: Path | None) -> Verdict:
    """The engine's verdict: from the record in `cache` when nothing it depends on changed, else measured."""
    key = record_key(engine, ref)
    path = cache / RECORD_FILE if cache is not None else None
    if path is not None:
        prev = _read(path).get(engine.name)
        if prev and prev.get("key") == key:
            v = Verdict(**prev)
            v.reason = v.reason + " (recorded " + v.date + ")"
            return v
    t0 = time.perf_counter()
    v = check(engine, ref)
    v.key, v.date = key, time.strftime("%Y-%m-%dT%H:%M:%S%z")
    v.metrics["verify_s"] = round(time.perf_counter() - t0, 2)
    if path is not None:
        with _locked(cache):
            records = _read(path)
            records[engine.name] = asdict(v)
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(records, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, path)
    return v


def read_records(cache: Path) -> dict[str, Any]:
    """Every recorded verification of a checkpoint's engines (for `effnet export` and docs/engines.md)."""
    return _read(cache / RECORD_FILE)
