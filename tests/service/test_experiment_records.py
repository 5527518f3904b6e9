"""The experiment database (service.experiments.records): queue, writer, feedback, retention, summary, crashes."""
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from service.experiments import records as rec
from service.experiments.records import (BadFeedback, DuplicateFeedback, ExperimentRecords, Feedback, FeedbackTooLate,
                                         RecordSettings, RecordsUnavailable, UnknownRequest)

ROOT = Path(__file__).resolve().parents[2]
SLOW_TIMER = dict(flush_ms=60_000.0, batch_size=100_000)  # the writer writes only when asked to


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def rows(path: Path, sql: str = "SELECT COUNT(*) FROM requests", args: tuple = ()) -> list[tuple]:
    """What another process sees in the database file."""
    with sqlite3.connect(path) as conn:
        return conn.execute(sql, args).fetchall()


def answer(r: ExperimentRecords, rid: str, variant: str = "b0", top1: int = 3, route: str = "fashion", **kw) -> bool:
    return r.record(rid, route, variant, top1=top1, score=0.9, latency_ms=10.0, **kw)


@pytest.fixture
def db(tmp_path):
    return tmp_path / "experiments.sqlite3"


def test_the_default_database_is_sqlite_in_wal_mode_in_the_state_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFNET_STATE_DIR", str(tmp_path / "state"))
    with ExperimentRecords() as r:
        answer(r, "a")
        r.flush()
        path = tmp_path / "state" / "experiments.sqlite3"
        assert rows(path, "PRAGMA journal_mode") == [("wal",)]
        assert rows(path) == [(1,)]
        assert path.stat().st_mode & 0o077 == 0  # labels and client hashes: the owner's only


def test_record_only_queues_and_a_full_queue_drops_and_counts(db):
    r = ExperimentRecords(db, RecordSettings(max_queue=100), start=False)
    taken = [answer(r, f"r{i}") for i in range(150)]
    assert taken == [True] * 100 + [False] * 50
    assert (r.counters.recorded, r.counters.dropped, r.queued()) == (100, 50, 100)
    assert rows(db) == [(0,)]  # nothing is written on the caller's thread
    r.start()
    r.flush()
    assert rows(db) == [(100,)] and r.counters.written == 100 and r.queued() == 0
    r.close()


def test_recording_costs_microseconds_on_the_callers_thread(db):
    r = ExperimentRecords(db, RecordSettings(max_queue=20_000), start=False)
    t0 = time.perf_counter()
    for i in range(5000):
        answer(r, f"r{i}", client_id=f"user-{i % 50}")
    per_call_us = (time.perf_counter() - t0) / 5000 * 1e6
    assert per_call_us < 50, per_call_us  # about 2 us here; the bound leaves room for a loaded machine
    r.close()
    assert rows(db) == [(5000,)]


def test_a_full_batch_is_written_without_waiting_for_the_timer(db):
    with ExperimentRecords(db, RecordSettings(flush_ms=60_000, batch_size=20)) as r:
        for i in range(20):
            answer(r, f"r{i}")
        deadline = time.monotonic() + 3
        while rows(db) != [(20,)] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rows(db) == [(20,)]


def test_a_few_records_are_written_after_flush_ms(db):
    """Three records, a batch of 1,000: only the flush timer writes them (the writer asked by nothing)."""
    with ExperimentRecords(db, RecordSettings(flush_ms=30, batch_size=1000)) as r:
        for i in range(3):
            answer(r, f"r{i}")
        deadline = time.monotonic() + 10
        while rows(db) != [(3,)] and time.monotonic() < deadline:
            time.sleep(0.005)
        assert rows(db) == [(3,)] and r.counters.written == 3


def test_feedback_for_a_record_still_queued_waits_for_it_and_is_committed_on_return(db):
    with ExperimentRecords(db, RecordSettings(**SLOW_TIMER)) as r:
        answer(r, "a", top1=3)
        assert rows(db) == [(0,)]  # answered, not yet written
        # The writer's timer is a minute and the feedback's wait 5 s: an answer at all means the feedback
        # woke the writer (else RecordsUnavailable).
        fb = r.add_feedback("a", 3)
        assert fb == Feedback("a", "fashion", "b0", 3, True)
        assert rows(db, "SELECT request_id, label, correct FROM feedback") == [("a", 3, 1)]


def test_feedback_the_writer_cannot_take_in_time_is_refused_and_not_kept(db):
    r = ExperimentRecords(db, RecordSettings(feedback_timeout_s=0.2), start=False)
    answer(r, "a")
    with pytest.raises(RecordsUnavailable) as e:
        r.add_feedback("a", 3)
    assert e.value.status == 503 and e.value.headers == {"Retry-After": "1"}
    assert "within 0.2 s" in str(e.value) and "nothing was kept" in str(e.value)
    r.start()
    r.flush()
    assert rows(db) == [(1,)] and rows(db, "SELECT COUNT(*) FROM feedback") == [(0,)]
    assert r.add_feedback("a", 3).correct  # the retry is taken
    r.close()


def test_unknown_feedback_is_404_and_a_shadow_record_is_not_an_answer(db):
    with ExperimentRecords(db) as r:
        answer(r, "a")
        answer(r, "a~mec", variant="mec", shadow_of="a")
        for rid in ("nope", "a~mec"):
            with pytest.raises(UnknownRequest) as e:
                r.add_feedback(rid, 1)
            assert e.value.status == 404
        assert rows(db, "SELECT COUNT(*) FROM feedback") == [(0,)]


def test_duplicate_feedback_is_409_and_keeps_the_first_label(db):
    with ExperimentRecords(db) as r:
        answer(r, "a", top1=3)
        assert r.add_feedback("a", 3).correct
        with pytest.raises(DuplicateFeedback) as e:
            r.add_feedback("a", 5)
        assert e.value.status == 409 and "label 3" in str(e.value)
        assert rows(db, "SELECT label, correct FROM feedback") == [(3, 1)]
        (s,) = r.summary("fashion")
        assert (s.labelled, s.correct) == (1, 1)


def test_feedback_past_the_window_is_410_and_changes_nothing(db):
    clock = Clock()
    settings = RecordSettings(feedback_window_s=3600, retention_s=7200)
    with ExperimentRecords(db, settings, clock=clock) as r:
        answer(r, "old")
        answer(r, "edge")
        r.flush()
        clock.now += 3600
        assert r.add_feedback("edge", 3).correct  # exactly at the window: still taken
        clock.now += 1
        with pytest.raises(FeedbackTooLate) as e:
            r.add_feedback("old", 3)
        assert e.value.status == 410
        assert rows(db, "SELECT request_id FROM feedback") == [("edge",)]


@pytest.mark.parametrize("rid, label", [("a", -1), ("a", "3"), ("a", True), ("a", 2.0), ("", 3), (None, 3),
                                        ("x" * 129, 3)])
def test_malformed_feedback_is_400(db, rid, label):
    with ExperimentRecords(db) as r:
        answer(r, "a")
        with pytest.raises(BadFeedback) as e:
            r.add_feedback(rid, label)
        assert e.value.status == 400
        assert rows(db, "SELECT COUNT(*) FROM feedback") == [(0,)]


def test_a_batch_of_feedback_gets_one_result_per_item_in_one_commit(db):
    with ExperimentRecords(db) as r:
        answer(r, "a", top1=1)
        answer(r, "b", top1=2)
        out = r.add_feedbacks([("a", 1), ("nope", 1), ("b", 7), ("a", 1), ("b", -2)])
        assert [type(x) for x in out] == [Feedback, UnknownRequest, Feedback, DuplicateFeedback, BadFeedback]
        assert [out[0].correct, out[2].correct] == [True, False]
        assert r.counters.feedback == 2


def test_feedback_labels_the_shadows_record_written_before_or_after_it(db):
    with ExperimentRecords(db) as r:
        answer(r, "a", top1=3)
        answer(r, "a~mec", variant="mec", top1=3, shadow_of="a")
        answer(r, "b", top1=3)
        fb = r.add_feedback("a", 3)
        assert fb.shadows == (("mec", True),)
        assert r.add_feedback("b", 3).shadows == ()
        answer(r, "b~mec", variant="mec", top1=4, shadow_of="b")  # the shadow answered after the feedback came
        r.flush()
        assert rows(db, "SELECT request_id, label, correct FROM feedback ORDER BY request_id") == [
            ("a", 3, 1), ("a~mec", 3, 1), ("b", 3, 1), ("b~mec", 3, 0)]
        assert rows(db, "SELECT assignment FROM requests WHERE request_id = 'b~mec'") == [("shadow",)]
        by = {(s.variant, s.shadow): s for s in r.summary("fashion")}
        assert set(by) == {("b0", False), ("mec", True)}
        assert (by["mec", True].labelled, by["mec", True].correct, by["mec", True].accuracy) == (2, 1, 0.5)


def test_the_summary_counts_per_variant_and_gives_latency_percentiles(db):
    clock = Clock()
    with ExperimentRecords(db, RecordSettings(latency_window=100), clock=clock) as r:
        for i in range(1, 101):
            r.record(f"b{i}", "fashion", "b0", top1=i % 2, score=0.5, latency_ms=float(i))
        for i in range(300):  # older and slower: outside the latency window, inside the counts
            r.record(f"m{i}", "fashion", "mec", top1=0, score=0.5, latency_ms=1000.0, at=clock.now - 10)
        for i in range(100):
            r.record(f"m{300 + i}", "fashion", "mec", top1=0, score=0.5, latency_ms=20.0)
        r.record("other", "digits", "lite0", top1=0, score=0.5, latency_ms=1.0)
        r.add_feedbacks([(f"b{i}", 1) for i in range(1, 41)])  # 20 of the 40 answered 1
        b0, mec = r.summary("fashion")
        assert (b0.variant, b0.shadow, b0.requests, b0.labelled, b0.correct, b0.accuracy) == ("b0", False, 100, 40, 20,
                                                                                             0.5)
        assert (b0.p50_ms, b0.p95_ms, b0.p99_ms) == pytest.approx((50.5, 95.05, 99.01))
        assert (mec.requests, mec.labelled, mec.accuracy, mec.p99_ms) == (400, 0, None, 20.0)
        assert [s.requests for s in r.summary("fashion", since=clock.now - 1)] == [100, 100]
        assert r.routes() == ["digits", "fashion"] and r.summary("nothing") == []


def test_client_ids_are_kept_as_keyed_hashes_stable_across_reopening(db):
    with ExperimentRecords(db) as r:
        answer(r, "a", client_id="alice")
        answer(r, "b", client_id="alice")
        answer(r, "c", client_id="bob")
        answer(r, "d")
    hashes = dict(rows(db, "SELECT request_id, client_hash FROM requests"))
    assert hashes["a"] == hashes["b"] != hashes["c"] and hashes["d"] is None
    assert "alice" not in hashes["a"] and len(hashes["a"]) == 16
    with ExperimentRecords(db) as r:
        answer(r, "e", client_id="alice")
    assert rows(db, "SELECT client_hash FROM requests WHERE request_id = 'e'") == [(hashes["a"],)]
    other = db.parent / "other.sqlite3"
    with ExperimentRecords(other) as r:  # another database, another key: hashes do not join across them
        answer(r, "a", client_id="alice")
    assert rows(other, "SELECT client_hash FROM requests") != [(hashes["a"],)]


def test_purge_deletes_at_most_its_limit_oldest_first_with_their_feedback(db):
    with ExperimentRecords(db, clock=Clock(130.0)) as r:
        for i in range(30):
            answer(r, f"r{i:02d}", at=100.0 + i)
        r.add_feedbacks([(f"r{i:02d}", 3) for i in range(30)])
    conn = rec.Db(rec.open_backend(db))
    assert rec.purge(conn, cutoff=125.0, limit=10) == 10
    assert rows(db, "SELECT MIN(request_id) FROM requests") == [("r10",)]
    assert rows(db, "SELECT COUNT(*) FROM feedback") == [(20,)]
    assert [rec.purge(conn, 125.0, 10), rec.purge(conn, 125.0, 10)] == [10, 5]
    assert rows(db) == [(5,)] and rows(db, "SELECT COUNT(*) FROM feedback") == [(5,)]
    conn.conn.close()


def test_the_writer_purges_expired_records_in_the_background(db):
    clock = Clock()
    settings = RecordSettings(feedback_window_s=50, retention_s=100, purge_every_s=0.02, purge_batch=7, flush_ms=5)
    with ExperimentRecords(db, settings, clock=clock) as r:
        for i in range(40):
            answer(r, f"old{i}")
        r.add_feedbacks([(f"old{i}", 3) for i in range(40)])
        clock.now += 101
        answer(r, "new")
        deadline = time.monotonic() + 5
        while r.counters.purged < 40 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert r.counters.purged == 40
        assert rows(db, "SELECT request_id FROM requests") == [("new",)]
        assert rows(db, "SELECT COUNT(*) FROM feedback") == [(0,)]
        with pytest.raises(UnknownRequest):  # purged: its record is gone, so is the right to label it
            r.add_feedback("old0", 3)


def test_close_writes_what_is_queued_and_refuses_what_comes_after(db):
    r = ExperimentRecords(db, RecordSettings(**SLOW_TIMER))
    for i in range(50):
        answer(r, f"r{i}")
    r.close()
    assert rows(db) == [(50,)]
    assert answer(r, "late") is False and r.counters.dropped == 1
    with pytest.raises(RecordsUnavailable):
        r.add_feedback("r0", 3)


def test_acknowledged_feedback_survives_the_process_being_killed(db):
    child = f"""
import sys
from service.experiments.records import ExperimentRecords, RecordSettings
r = ExperimentRecords({str(db)!r}, RecordSettings(flush_ms=60_000, batch_size=100_000))
for i in range(2000):
    r.record(f"r{{i}}", "fashion", "b0", top1=i % 3, score=0.9, latency_ms=5.0)
    r.add_feedback(f"r{{i}}", 1)
    print(f"r{{i}}", flush=True)  # acknowledged: add_feedback has returned
"""
    p = subprocess.Popen([sys.executable, "-c", child], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    acked = []
    timer = threading.Timer(20, p.kill)  # a child that never acknowledges fails the test, not the run
    timer.start()
    try:
        for line in p.stdout:
            acked.append(line.strip())
            if len(acked) == 30:
                os.kill(p.pid, signal.SIGKILL)  # no close, no atexit, no flush: the writer is cut wherever it is
                break
        acked += [line.strip() for line in p.stdout]  # acknowledged before the signal landed
        p.wait()
    finally:
        timer.cancel()
    assert p.returncode == -signal.SIGKILL, p.stderr.read()
    assert 30 <= len(acked) < 2000
    kept = {rid for (rid,) in rows(db, "SELECT request_id FROM feedback")}
    assert set(acked) <= kept
    with ExperimentRecords(db) as r:  # reopened: the acknowledged labels count
        (s,) = r.summary("fashion")
        assert s.labelled >= len(acked) and s.correct == sum(int(rid[1:]) % 3 == 1 for rid in kept)
        with pytest.raises(DuplicateFeedback):
            r.add_feedback(acked[-1], 1)


def test_settings_that_contradict_each_other_are_refused():
    with pytest.raises(ValueError, match="feedback_window_s"):
        RecordSettings(feedback_window_s=10, retention_s=5)
    with pytest.raises(ValueError, match="max_queue"):
        RecordSettings(max_queue=0)


def test_a_database_url_chooses_its_backend(db):
    from service.experiments.postgres import PostgresBackend

    assert rec.open_backend(f"sqlite://{db}").path == db
    assert isinstance(rec.open_backend("postgresql://u:secret@127.0.0.1:1/effnet"), PostgresBackend)  # not connected
