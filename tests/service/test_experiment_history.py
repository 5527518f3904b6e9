"""An experiment over time (service.experiments.history): cumulative counts per variant, bucketed by feedback time."""
import pytest

from service.experiments.history import bucket_width, history
from service.experiments.records import ExperimentRecords
from service.experiments.stats import wilson


class Clock:
    now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_width_fits_the_span_in_max_points():
    assert bucket_width(0.0, 59.0, 60) == 1.0
    assert bucket_width(0.0, 600.0, 60) == 11.0  # 601 s in 60 buckets of whole seconds
    assert bucket_width(5.0, 5.0, 1) == 1.0
    with pytest.raises(ValueError):
        bucket_width(0.0, 1.0, 0)


def test_history_is_cumulative_per_variant_with_wilson_bounds_and_counts_shadows_apart(tmp_path):
    clock = Clock()
    with ExperimentRecords(tmp_path / "e.sqlite3", clock=clock) as r:
        # b0 answers 3 right at t0, 1 wrong at t0 + 100; mec: 2 wrong at t0 + 100; b0's first answer is shadowed by mec
        for i, (variant, top1) in enumerate([("b0", 1), ("b0", 1), ("b0", 1), ("b0", 2), ("mec", 2), ("mec", 2)]):
            r.record(f"r{i}", "fashion", variant, top1=top1, score=0.9, latency_ms=5.0)
        r.record("s0", "fashion", "mec", top1=1, score=0.8, latency_ms=6.0, shadow_of="r0")
        r.record("x", "other", "b0", top1=1, score=0.9, latency_ms=5.0)
        r.flush()
        for rid in ("r0", "r1", "r2", "x"):
            r.add_feedback(rid, 1)
        clock.now += 100
        for rid in ("r3", "r4", "r5"):
            r.add_feedback(rid, 1)
        h = r._read(lambda db: history(db, "fashion", max_points=10))
        empty = r._read(lambda db: history(db, "nowhere"))
    assert empty == {}
    assert set(h) == {"b0", "mec", "mec (shadow)"}
    assert [(p["labelled"], p["correct"]) for p in h["b0"]] == [(3, 3), (4, 3)]
    assert [(p["labelled"], p["correct"]) for p in h["mec"]] == [(2, 0)]
    assert [(p["labelled"], p["correct"]) for p in h["mec (shadow)"]] == [(1, 1)]  # labelled with r0
    last = h["b0"][-1]
    assert last["accuracy"] == 0.75 and (last["low"], last["high"]) == pytest.approx(wilson(3, 4))
    # 101 s in at most 10 buckets of 11 s: the two feedback times fall in the first and the last bucket
    assert h["b0"][0]["t"] == 1_000_000.0 + 11 and h["b0"][1]["t"] == 1_000_000.0 + 10 * 11
    assert h["b0"][0]["t"] < h["b0"][1]["t"]
