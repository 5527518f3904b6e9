"""The experiment records on a real PostgreSQL server (tests/support/postgres.py): the same behaviours as on
SQLite, two gateways on one database, a killed gateway, a restarted server, a password that stays secret."""
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psycopg
import pytest

from service.experiments.postgres import PostgresBackend, redact
from service.experiments.records import (DuplicateFeedback, ExperimentRecords, FeedbackTooLate, RecordSettings,
                                         RecordsUnavailable, UnknownRequest, open_backend)
from tests.support.postgres import PASSWORD, postgres_server, postgres_url  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[2]
QUICK = dict(flush_ms=5.0, peer_wait_s=0.3, retry_s=0.1)  # short waits: a test waits for behaviours, not timers


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def answer(r: ExperimentRecords, rid: str, variant: str = "b0", top1: int = 3, **kw) -> bool:
    return r.record(rid, "fashion", variant, top1=top1, score=0.9, latency_ms=10.0, **kw)


def count(url: str, sql: str) -> int:
    with psycopg.connect(url) as conn:
        return conn.execute(sql).fetchone()[0]


def test_a_postgresql_url_opens_the_postgresql_backend(postgres_url):
    backend = open_backend(postgres_url)
    assert isinstance(backend, PostgresBackend) and backend.shared
    assert backend.sql("SELECT ? WHERE x LIKE 'a%'") == "SELECT %s WHERE x LIKE 'a%%'"


def test_records_feedback_and_summary_behave_as_on_sqlite(postgres_url):
    clock = Clock()
    settings = RecordSettings(**QUICK, feedback_window_s=3600, retention_s=7200)
    with ExperimentRecords(postgres_url, settings, clock=clock) as r:
        answer(r, "a", top1=3)
        answer(r, "b", variant="mec", top1=1)
        answer(r, "a.shadow", variant="compact", top1=3, shadow_of="a")
        answer(r, "old", at=clock.now - 4000)
        fb = r.add_feedback("a", 3)
        assert (fb.route, fb.variant, fb.correct, fb.shadows) == ("fashion", "b0", True, (("compact", True),))
        assert r.add_feedback("b", 3).correct is False
        with pytest.raises(DuplicateFeedback, match="label 3"):
            r.add_feedback("a", 5)
        with pytest.raises(UnknownRequest):
            r.add_feedback("nobody", 1)
        with pytest.raises(UnknownRequest):  # a shadow's record is not an answer
            r.add_feedback("a.shadow", 1)
        with pytest.raises(FeedbackTooLate):
            r.add_feedback("old", 3)
        answer(r, "b.shadow", variant="compact", top1=3, shadow_of="b")  # after its answer's feedback
        r.flush()
        got = {(s.variant, s.shadow): (s.requests, s.labelled, s.correct) for s in r.summary("fashion")}
        assert got == {("b0", False): (2, 1, 1), ("mec", False): (1, 1, 0), ("compact", True): (2, 2, 2)}
        assert r.routes() == ["fashion"]
    assert count(postgres_url, "SELECT COUNT(*) FROM feedback") == 4  # the refused items changed nothing


def test_gateways_starting_together_create_the_schema_once(postgres_url):
    barrier, opened, failed = threading.Barrier(6), [], []

    def start():
        barrier.wait()
        try:
            opened.append(ExperimentRecords(postgres_url, RecordSettings(**QUICK)))
        except Exception as e:  # noqa: BLE001 (the assert shows it)
            failed.append(e)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert failed == []
        assert len({r._client_key for r in opened}) == 1  # one key: a client hashes alike on every gateway
    finally:
        for r in opened:
            r.close()


def test_feedback_given_to_one_gateway_labels_an_answer_recorded_by_another(postgres_url):
    with ExperimentRecords(postgres_url, RecordSettings(**QUICK)) as a, \
            ExperimentRecords(postgres_url, RecordSettings(**QUICK)) as b:
        answer(a, "r1", top1=2)
        a.flush()
        assert b.add_feedback("r1", 2).correct is True
        with pytest.raises(DuplicateFeedback):
            a.add_feedback("r1", 4)
        (s,) = a.summary("fashion")
        assert (s.requests, s.labelled, s.correct) == (1, 1, 1)


def test_the_same_feedback_sent_to_two_gateways_at_once_is_taken_once(postgres_url):
    with ExperimentRecords(postgres_url, RecordSettings(**QUICK)) as a, \
            ExperimentRecords(postgres_url, RecordSettings(**QUICK)) as b:
        ids = [f"r{i}" for i in range(100)]
        for rid in ids:
            answer(a, rid)
        a.flush()
        barrier, results = threading.Barrier(2), {}

        def give(r, name, label):
            barrier.wait()
            results[name] = r.add_feedbacks([(rid, label) for rid in ids])

        threads = [threading.Thread(target=give, args=(a, "a", 3)), threading.Thread(target=give, args=(b, "b", 4))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, rid in enumerate(ids):
            got = [type(results[g][i]).__name__ for g in ("a", "b")]
            assert sorted(got) == ["DuplicateFeedback", "Feedback"], (rid, got)
        kept = {g: sum(type(x).__name__ == "Feedback" for x in results[g]) for g in "ab"}
        assert count(postgres_url, "SELECT COUNT(*) FROM feedback") == 100
        assert count(postgres_url, "SELECT COUNT(*) FROM feedback WHERE label = 3") == kept["a"]


def test_feedback_waits_for_a_record_still_queued_by_another_gateway_then_404(postgres_url):
    a = ExperimentRecords(postgres_url, RecordSettings(**QUICK), start=False)  # its writer writes when started
    try:
        with ExperimentRecords(postgres_url, RecordSettings(**{**QUICK, "peer_wait_s": 0.2})) as b:
            answer(a, "queued")
            with pytest.raises(UnknownRequest):  # a bounded wait, then 404
                b.add_feedback("queued", 3)
        with ExperimentRecords(postgres_url, RecordSettings(**{**QUICK, "peer_wait_s": 30.0})) as b:
            threading.Timer(0.3, a.start).start()  # a's writer commits the record while b waits for it
            assert b.add_feedback("queued", 3).correct is True
    finally:
        a.close()


def test_a_shadow_record_and_its_answers_feedback_written_at_once_by_two_gateways_meet(postgres_url):
    with ExperimentRecords(postgres_url, RecordSettings(**QUICK)) as a, \
            ExperimentRecords(postgres_url, RecordSettings(**QUICK)) as b:
        ids = [f"r{i}" for i in range(40)]
        for rid in ids:
            answer(a, rid)
        a.flush()
        barrier = threading.Barrier(2)

        def shadows():
            barrier.wait()
            for rid in ids:
                answer(a, f"{rid}.shadow", variant="compact", shadow_of=rid)
                a.flush()

        def labels():
            barrier.wait()
            for rid in ids:
                b.add_feedback(rid, 3)

        threads = [threading.Thread(target=shadows), threading.Thread(target=labels)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        shadow = [s for s in a.summary("fashion") if s.shadow][0]
        assert (shadow.requests, shadow.labelled) == (40, 40)  # neither side missed the other


def test_acknowledged_feedback_survives_the_gateway_being_killed(postgres_url):
    child = """
import os
from service.experiments.records import ExperimentRecords, RecordSettings
r = ExperimentRecords(os.environ["EXPERIMENTS_DB"], RecordSettings(flush_ms=60_000, batch_size=100_000))
for i in range(2000):
    r.record(f"r{i}", "fashion", "b0", top1=i % 3, score=0.9, latency_ms=5.0)
    r.add_feedback(f"r{i}", 1)
    print(f"r{i}", flush=True)  # acknowledged: add_feedback has returned
"""
    p = subprocess.Popen([sys.executable, "-c", child], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env={**os.environ, "PYTHONPATH": str(ROOT), "EXPERIMENTS_DB": postgres_url})
    acked = []
    timer = threading.Timer(30, p.kill)  # a child that never acknowledges fails the test, not the run
    timer.start()
    try:
        for line in p.stdout:
            acked.append(line.strip())
            if len(acked) == 30:
                os.kill(p.pid, signal.SIGKILL)  # no close, no flush: the writer is cut wherever it is
                break
        acked += [line.strip() for line in p.stdout]
        p.wait()
    finally:
        timer.cancel()
    assert p.returncode == -signal.SIGKILL, p.stderr.read()
    with psycopg.connect(postgres_url) as conn:
        kept = {rid for (rid,) in conn.execute("SELECT request_id FROM feedback")}
    assert 30 <= len(acked) < 2000 and set(acked) <= kept
    with ExperimentRecords(postgres_url, RecordSettings(**QUICK)) as r:
        with pytest.raises(DuplicateFeedback):
            r.add_feedback(acked[-1], 1)


def test_a_server_restart_answers_503_meanwhile_and_loses_nothing_acknowledged(postgres_server, postgres_url,
                                                                               caplog):
    caplog.set_level(logging.DEBUG)
    with ExperimentRecords(postgres_url, RecordSettings(**QUICK)) as r:
        answer(r, "before")
        assert r.add_feedback("before", 3).correct
        postgres_server.stop("fast")
        try:
            answer(r, "during", top1=1)  # queued; written once the database is back
            with pytest.raises(RecordsUnavailable) as refused:
                r.add_feedback("during", 1)
            assert refused.value.status == 503
            with pytest.raises(RecordsUnavailable):
                r.summary("fashion")
        finally:
            postgres_server.start()
        assert r.add_feedback("during", 1).correct  # the writer reconnected and wrote the queued record
        (s,) = r.summary("fashion")
        assert (s.requests, s.labelled, s.correct) == (2, 2, 2)
        assert r.counters.lost == 0
    assert "write failed" in caplog.text and PASSWORD not in caplog.text


def test_the_password_appears_in_no_repr_log_or_error(postgres_server, caplog):
    url = postgres_server.url("postgres", password="wrong-" + PASSWORD)
    assert PASSWORD not in repr(open_backend(url))
    assert redact(url) == f"postgresql://effnet:***@127.0.0.1:{postgres_server.port}/postgres"
    assert redact("postgresql://127.0.0.1/db") == "postgresql://127.0.0.1/db"
    caplog.set_level(logging.DEBUG)
    for bad in (url, url.replace(str(postgres_server.port), "1")):  # refused password, nobody listening
        with ExperimentRecords(bad, RecordSettings(**QUICK)) as r:  # the gateway starts; the experiment waits
            with pytest.raises(RecordsUnavailable) as refused:
                r.add_feedback("any", 1)
            assert PASSWORD not in str(refused.value)
    assert "unreachable" in caplog.text and "***" in caplog.text and PASSWORD not in caplog.text


def test_a_gateway_started_while_the_database_is_down_records_once_it_is_up(postgres_server, postgres_url):
    postgres_server.stop("fast")
    try:
        r = ExperimentRecords(postgres_url, RecordSettings(**QUICK))  # no error: answers go on unrecorded-for-now
        answer(r, "early", top1=2)
        with pytest.raises(RecordsUnavailable):
            r.add_feedback("early", 2)
    finally:
        postgres_server.start()
    with r:
        assert r.add_feedback("early", 2).correct  # the writer made the schema and wrote the queued record
        assert r._client_key is not None and r.counters.lost == 0
