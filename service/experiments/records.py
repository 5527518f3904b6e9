"""The experiment database: every answered request of an experiment, and the feedback that says if it was right.

- **Off the hot path.** `record()` only appends to a bounded in-memory queue (when full it drops and counts);
  one writer thread commits the queue in batches, every `batch_size` records or after `flush_ms`.
- **Feedback is acknowledged once committed.** `add_feedback()` hands it to the writer and returns after its
  transaction commits. The writer writes every queued record before the feedback that follows it, so feedback
  for an answer whose record is still queued waits for it (bounded) instead of being called unknown. Unknown,
  duplicate and late feedback raise their own errors (404, 409, 410) and change nothing. An answer's feedback
  also labels its shadow's record, written before or after it: a shadow is measured on the same requests.
- **Bounded.** Feedback is taken for `feedback_window_s` after the answer; records are kept `retention_s`,
  then deleted by the writer in chunks of at most `purge_batch` rows, one short transaction each.
- **Portable.** A `backends.Backend` is all the rest needs (DB-API connections, placeholders, named locks); the
  SQL is what SQLite and PostgreSQL share. On a database shared by several gateways (PostgreSQL), feedback for
  a request not on record waits `peer_wait_s` for the others' writers before its 404.
- **Outages.** A failed connection is closed and opened again when next needed (after `retry_s`); meanwhile
  feedback and summaries answer 503 and records wait in the queue.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import logging
import math
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backends import DB_FILE, Backend, SQLiteBackend, open_backend  # noqa: F401 (importable from here too)
from .feedback_errors import (BadFeedback, DuplicateFeedback, FeedbackError, FeedbackTooLate,  # noqa: F401
                              RecordsUnavailable, UnknownRequest, bad_feedback)

logger = logging.getLogger("effnet.experiments")

DAY_S = 86400.0

SCHEMA = (  # `at`: seconds since the epoch; `shadow_of`: NULL for an answer, else the answer a shadow mirrored
    """CREATE TABLE IF NOT EXISTS requests (
        request_id TEXT PRIMARY KEY, route TEXT NOT NULL, variant TEXT NOT NULL, assignment TEXT NOT NULL,
        client_hash TEXT, top1 INTEGER NOT NULL, score DOUBLE PRECISION NOT NULL,
        latency_ms DOUBLE PRECISION NOT NULL, at DOUBLE PRECISION NOT NULL, shadow_of TEXT)""",
    # covers the summary's counts and latencies: it reads the index, never the table
    "CREATE INDEX IF NOT EXISTS requests_by_route ON requests (route, variant, at, shadow_of, latency_ms)",
    "CREATE INDEX IF NOT EXISTS requests_by_age ON requests (at)",
    "CREATE INDEX IF NOT EXISTS requests_by_shadowed ON requests (shadow_of)",
    """CREATE TABLE IF NOT EXISTS feedback (
        request_id TEXT PRIMARY KEY, label INTEGER NOT NULL, correct INTEGER NOT NULL, at DOUBLE PRECISION NOT NULL)""",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)


@dataclass(frozen=True)
class RecordSettings:
    batch_size: int = 256  # records per commit under load: one fsync per batch, not per answer
    flush_ms: float = 50.0  # a record waits at most this long for its batch when traffic is light
    max_queue: int = 10_000  # records held in memory when the database falls behind; past it they are dropped
    feedback_timeout_s: float = 5.0  # how long add_feedback waits for the writer before answering 503
    feedback_window_s: float = 7 * DAY_S  # feedback later than this after the answer is refused (410)
    retention_s: float = 30 * DAY_S  # records older than this are deleted
    purge_every_s: float = 60.0  # how often the writer looks for expired records
    purge_batch: int = 1000  # rows deleted per transaction, so a purge never holds the writer for long
    latency_window: int = 10_000  # latency percentiles are over each variant's latest N records
    busy_timeout_ms: int = 5000  # how long a connection waits for another process's lock
    peer_wait_s: float = 1.0  # a shared database: another gateway's writer commits its records within this
    retry_s: float = 1.0  # after a database failure, the records wait this long before the writer tries again

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_queue", "purge_batch", "latency_window", "busy_timeout_ms"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("flush_ms", "feedback_timeout_s", "feedback_window_s", "purge_every_s", "peer_wait_s", "retry_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")
        if self.retention_s < self.feedback_window_s:
            raise ValueError(f"retention_s ({self.retention_s}) must be at least feedback_window_s "
                             f"({self.feedback_window_s}): feedback needs the record it labels")


@dataclass(frozen=True)
class Feedback:
    """Committed feedback: the answer it labels, and for each shadow of that answer whether it was right."""
    request_id: str
    route: str
    variant: str
    label: int
    correct: bool
    shadows: tuple[tuple[str, bool], ...] = ()


@dataclass(frozen=True)
class VariantSummary:
    """One variant's records in a route; `shadow` rows count its mirrored requests apart from served ones."""
    variant: str
    shadow: bool
    requests: int
    labelled: int
    correct: int
    p50_ms: float
    p95_ms: float
    p99_ms: float

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None


@dataclass
class Counters:
    recorded: int = 0  # taken into the queue
    dropped: int = 0  # refused by a full queue (or after close)
    written: int = 0  # committed
    lost: int = 0  # taken from the queue but not committed (a database error)
    feedback: int = 0  # feedback rows committed for answered requests
    purged: int = 0  # records deleted by retention


class Db:
    """A backend's connection, opened when first used and after `drop()`; DB-API 2 cursors only (not sqlite3's
    `conn.execute`)."""

    def __init__(self, backend: Backend) -> None:
        self.backend, self._conn = backend, None

    @property
    def conn(self) -> Any:
        self._conn = self._conn or self.backend.connect()
        return self._conn

    def drop(self) -> None:
        conn, self._conn = self._conn, None
        with contextlib.suppress(Exception):  # a connection that failed closes in whatever state it is
            conn and conn.close()

    def run(self, statement: str, args: tuple = ()) -> Any:
        cur = self.conn.cursor()
        cur.execute(self.backend.sql(statement), args)
        return cur

    def many(self, statement: str, rows: list[tuple]) -> None:
        if rows:
            self.conn.cursor().executemany(self.backend.sql(statement), rows)


ADD_FEEDBACK = ("INSERT INTO feedback (request_id, label, correct, at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (request_id) DO NOTHING")


def create_schema(db: Db) -> bytes:
    """The tables, and the key for client hashes (made once, shared by every process on the database)."""
    db.backend.lock(db, ["schema"])  # gateways that start together create it one after the other
    for statement in SCHEMA:
        db.run(statement)
    db.run("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
           ("client_key", secrets.token_hex(16)))
    key = db.run("SELECT value FROM meta WHERE key = ?", ("client_key",)).fetchone()[0]
    db.conn.commit()
    return bytes.fromhex(key)


def insert_requests(db: Db, rows: list[tuple]) -> None:
    """Rows in `requests` column order; a request id already there is kept as it was. A shadow's record
    written after its answer's feedback gets the same label here."""
    db.many("INSERT INTO requests (request_id, route, variant, assignment, client_hash, top1, score, latency_ms, "
            "at, shadow_of) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (request_id) DO NOTHING", rows)
    db.many("INSERT INTO feedback (request_id, label, correct, at) "
            "SELECT r.request_id, f.label, CASE WHEN r.top1 = f.label THEN 1 ELSE 0 END, f.at "
            "FROM requests r JOIN feedback f ON f.request_id = r.shadow_of WHERE r.request_id = ? "
            "ON CONFLICT (request_id) DO NOTHING", [(r[0],) for r in rows if r[9] is not None])


def apply_feedback(db: Db, request_id: str, label: int, now: float, window_s: float) -> Feedback | FeedbackError:
    """Label one answered request (and its shadows) inside the caller's transaction, or say why not."""
    row = db.run("SELECT route, variant, top1, at, shadow_of FROM requests WHERE request_id = ?",
                 (request_id,)).fetchone()
    if row is None or row[4] is not None:  # a shadow's record is not an answer anyone was given
        return UnknownRequest(f"no answered request {request_id!r} on record (feedback names the request_id "
                              "of an answer, within the retention window)")
    route, variant, top1, at, _ = row
    if now - at > window_s:
        return FeedbackTooLate(f"request {request_id!r} was answered {(now - at) / 3600:.1f} h ago; feedback "
                               f"is taken for {window_s / 3600:.1f} h")
    if db.run(ADD_FEEDBACK, (request_id, label, int(top1 == label), now)).rowcount == 0:
        # the insert is the check, so two gateways on one database cannot both take it
        kept = db.run("SELECT label FROM feedback WHERE request_id = ?", (request_id,)).fetchone()
        return DuplicateFeedback(f"request {request_id!r} already has feedback (label {kept[0]}); it is kept")
    shadows = db.run("SELECT request_id, variant, top1 FROM requests WHERE shadow_of = ?", (request_id,)).fetchall()
    db.many(ADD_FEEDBACK, [(sid, label, int(stop1 == label), now) for sid, _, stop1 in shadows])
    return Feedback(request_id, route, variant, label, top1 == label,
                    tuple((sv, stop1 == label) for _, sv, stop1 in shadows))


def purge(db: Db, cutoff: float, limit: int) -> int:
    """Delete at most `limit` records older than `cutoff` (oldest first) and their feedback; commits."""
    ids = db.run("SELECT request_id FROM requests WHERE at < ? ORDER BY at LIMIT ?", (cutoff, limit)).fetchall()
    db.many("DELETE FROM feedback WHERE request_id = ?", ids)
    db.many("DELETE FROM requests WHERE request_id = ?", ids)
    db.conn.commit()
    return len(ids)


def summarise(db: Db, route: str, since: float, latency_window: int) -> list[VariantSummary]:
    """Per variant of `route` (served and shadow apart): requests, labelled, correct, latency percentiles
    (of the latest `latency_window` records, so the cost of a call is bounded however long the test runs)."""
    counts = db.run("SELECT variant, COUNT(*) - COUNT(shadow_of), COUNT(shadow_of) FROM requests "
                    "WHERE route = ? AND at >= ? GROUP BY variant ORDER BY variant", (route, since)).fetchall()
    # from the (smaller) feedback table to the records: CROSS JOIN keeps that order in SQLite's planner
    labels = {(v, bool(shadow)): (n, c) for v, shadow, n, c in db.run(
        "SELECT r.variant, CASE WHEN r.shadow_of IS NULL THEN 0 ELSE 1 END, COUNT(*), SUM(f.correct) FROM feedback f "
        "CROSS JOIN requests r WHERE r.request_id = f.request_id AND r.route = ? AND r.at >= ? GROUP BY 1, 2",
        (route, since)).fetchall()}
    out = []
    groups = [(v, shadow, n) for v, served, mirrored in counts for shadow, n in ((False, served), (True, mirrored))]
    for variant, shadow, n in [g for g in groups if g[2]]:
        labelled, correct = labels.get((variant, shadow), (0, 0))
        lat = db.run("SELECT latency_ms FROM requests WHERE route = ? AND variant = ? AND at >= ? AND shadow_of "
                     f"{'IS NOT NULL' if shadow else 'IS NULL'} ORDER BY at DESC LIMIT ?",
                     (route, variant, since, latency_window)).fetchall()
        p50, p95, p99 = (float(x) for x in np.percentile(np.array(lat, dtype=float), [50, 95, 99]))
        out.append(VariantSummary(variant, bool(shadow), int(n), int(labelled), int(correct), p50, p95, p99))
    return out


def unreachable(e: BaseException) -> bool:
    """Whether `e` says the database cannot be reached now (DB-API's OperationalError), rather than refused the SQL."""
    return "OperationalError" in {c.__name__ for c in type(e).__mro__}


@dataclass
class _Op:
    """Work the writer does after writing the queued records: label these requests (none: a flush barrier)."""
    items: list[tuple[str, int]]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class ExperimentRecords:
    """The records of one gateway: `record()` on the hot path, `add_feedback()` and `summary()` from handlers
    (both block: call them from a thread, not the event loop), `close()` at shutdown (writes what is queued).

    `clock` gives the time of records and feedback (seconds since the epoch); `start=False` leaves the writer
    stopped until `start()`, so that what the queue does alone can be seen."""

    def __init__(self, where: str | os.PathLike | Backend | None = None, settings: RecordSettings | None = None,
                 clock: Callable[[], float] = time.time, start: bool = True) -> None:
        self.settings = settings or RecordSettings()
        self.backend = open_backend(where, self.settings.busy_timeout_ms)
        self.clock, self.counters = clock, Counters()
        self._cond = threading.Condition()  # guards the queue, the ops and the flags; the writer waits on it
        self._queue: deque[tuple] = deque()
        self._ops: deque[_Op] = deque()
        self._first_queued = 0.0  # monotonic time the oldest queued record arrived
        self._closing = self._started = False
        self._writer_db, self._reader_db = Db(self.backend), Db(self.backend)
        self._client_key: bytes | None = None
        try:  # a database server that is down does not stop the gateway: the writer makes the schema later
            self._client_key = create_schema(self._writer_db)
        except Exception as e:
            if not unreachable(e):
                raise
            logger.warning("experiment records: the database is unreachable (%s: %s); records wait in memory, "
                           "feedback answers 503 until it is back", type(e).__name__, " ".join(str(e).split())[:300])
            self._writer_db.drop()
        self._rlock = threading.Lock()  # the reader's connection serves one summary at a time
        self._next_purge = self._retry_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="effnet-experiment-writer", daemon=True)
        if start:
            self.start()

    def start(self) -> None:
        with self._cond:
            started, self._started = self._started, True
        if not started:
            self._thread.start()

    def __enter__(self) -> ExperimentRecords:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # hot path

    def record(self, request_id: str, route: str, variant: str, top1: int, score: float, latency_ms: float, *,
               assignment: str = "split", client_id: str | None = None, at: float | None = None,
               shadow_of: str | None = None) -> bool:
        """Queue one answered request (or, with `shadow_of`, the shadow's answer to that request: its record
        gets its own id, `request_id` here, and the answer's feedback). Never waits; False when dropped."""
        row = (request_id, route, variant, "shadow" if shadow_of else assignment, client_id, int(top1),
               float(score), float(latency_ms), self.clock() if at is None else float(at), shadow_of)
        with self._cond:
            if self._closing or len(self._queue) >= self.settings.max_queue:
                self.counters.dropped += 1
                return False
            self._queue.append(row)
            self.counters.recorded += 1
            if len(self._queue) == 1:  # the writer starts the flush_ms clock
                self._first_queued = time.monotonic()
                self._cond.notify()
            elif len(self._queue) == self.settings.batch_size:
                self._cond.notify()
        return True

    # feedback

    def add_feedback(self, request_id: str, label: int) -> Feedback:
        """Label an answered request; returns once committed, else raises a FeedbackError (see the module)."""
        result = self.add_feedbacks([(request_id, label)])[0]
        if isinstance(result, FeedbackError):
            raise result
        return result

    def add_feedbacks(self, items: Iterable[tuple[str, int]]) -> list[Feedback | FeedbackError]:
        """Label several answers in one transaction: a result or an error per item, in order, all committed
        when this returns. Raises RecordsUnavailable when the writer cannot commit in time (nothing is kept
        when the writer had not started on them)."""
        items = list(items)
        checked: list[Feedback | FeedbackError | None] = [bad_feedback(rid, label) for rid, label in items]
        todo = [(rid, int(label)) for (rid, label), bad in zip(items, checked) if bad is None]
        if todo:
            results = self._submit(todo)
            give_up = time.monotonic() + (self.settings.peer_wait_s if self.backend.shared else 0.0)
            while (waiting := [i for i, r in enumerate(results) if isinstance(r, UnknownRequest)]) and \
                    time.monotonic() < give_up:  # the record may sit in another gateway's queue
                time.sleep(self.settings.flush_ms / 1000)
                for i, result in zip(waiting, self._submit([todo[i] for i in waiting])):
                    results[i] = result
            done = iter(results)
            checked = [bad if bad is not None else next(done) for bad in checked]
        return checked  # type: ignore[return-value]

    def flush(self, timeout: float | None = None) -> None:
        """Return once everything recorded before the call is committed (RecordsUnavailable past `timeout`)."""
        self._submit([], timeout)

    def _submit(self, items: list[tuple[str, int]], timeout: float | None = None) -> list:
        op = _Op(items)
        with self._cond:
            if self._closing:
                raise RecordsUnavailable("the experiment records are closed")
            self._ops.append(op)
            self._cond.notify()
        wait = self.settings.feedback_timeout_s if timeout is None else timeout
        try:
            return op.future.result(wait)
        except concurrent.futures.TimeoutError:
            kept = "nothing was kept" if op.future.cancel() else "it may yet be kept (a 409 on the retry says so)"
            raise RecordsUnavailable(f"the experiment database did not commit within {wait:g} s: {kept}; "
                                     "retry") from None

    # reading

    def summary(self, route: str, since: float = 0.0) -> list[VariantSummary]:
        """Per variant of `route`, served and shadow apart, records at or after `since` (see `summarise`)."""
        return self._read(lambda db: summarise(db, route, since, self.settings.latency_window))

    def history(self, route: str, max_points: int = 60) -> dict[str, list[dict]]:
        """Per variant of `route`, cumulative labelled and correct answers as feedback came in (`history.history`)."""
        from .history import history

        return self._read(lambda db: history(db, route, max_points))

    def routes(self) -> list[str]:
        """The routes that have records."""
        return self._read(lambda db: [r[0] for r in db.run("SELECT DISTINCT route FROM requests ORDER BY 1")])

    def _read(self, query: Callable[[Db], Any]) -> Any:
        with self._rlock:
            try:
                result = query(self._reader_db)
                self._reader_db.conn.rollback()  # end the read transaction: the WAL can be checkpointed past it
                return result
            except Exception as e:
                logger.exception("experiment records: read failed")
                self._reader_db.drop()
                raise RecordsUnavailable(f"the experiment database failed: {type(e).__name__}") from None

    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    # the writer

    def _run(self) -> None:
        while True:
            rows, ops, closing = self._take()
            s = self.settings
            try:
                if rows or ops:
                    self._write(rows, ops, closing)
                if self._client_key is not None and time.monotonic() >= self._next_purge:
                    n = purge(self._writer_db, self.clock() - s.retention_s, s.purge_batch)
                    self.counters.purged += n
                    # a full chunk means more are waiting: the next after the next batch, not a minute later
                    self._next_purge = time.monotonic() + (s.flush_ms / 1000 if n == s.purge_batch
                                                           else s.purge_every_s)
            except Exception:  # the writer outlives any one failure: it reconnects after retry_s
                logger.exception("experiment records: write failed")
                self._writer_db.drop()
                self._retry_at = time.monotonic() + s.retry_s
                self._next_purge = max(self._next_purge, self._retry_at)
            if closing and not rows and not ops:
                return

    def _take(self) -> tuple[list[tuple], list[_Op], bool]:
        """Wait for a full batch, the oldest record's flush_ms (not before `_retry_at`), feedback, a purge or close."""
        s = self.settings
        with self._cond:
            while not (self._ops or self._closing):
                flush_at = (0.0 if len(self._queue) >= s.batch_size else self._first_queued + s.flush_ms / 1000) \
                    if self._queue else math.inf
                left = min(self._next_purge, max(flush_at, self._retry_at)) - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            rows, ops, self._queue, self._ops = list(self._queue), self._ops, deque(), deque()
            return rows, [op for op in ops if op.future.set_running_or_notify_cancel()], self._closing

    def _write(self, rows: list[tuple], ops: list[_Op], closing: bool) -> None:
        db, now = self._writer_db, self.clock()
        try:
            if self._client_key is None:
                self._client_key = create_schema(db)
            # an answer's feedback and its shadow's record, written by two gateways at once, see each other
            db.backend.lock(db, [r[9] for r in rows if r[9]] + [rid for op in ops for rid, _ in op.items])
            if rows:
                insert_requests(db, [self._hashed(r) for r in rows])
            results = [[apply_feedback(db, rid, label, now, self.settings.feedback_window_s)
                        for rid, label in op.items] for op in ops]
            db.conn.commit()
        except Exception as e:  # the transaction ends when _run drops the connection
            # an unreachable database (DB-API's OperationalError): the records wait for the next try
            keep = 0 if closing or not unreachable(e) else \
                max(0, min(len(rows), self.settings.max_queue - self.queued()))
            with self._cond:
                self._queue.extendleft(reversed(rows[:keep]))
            self.counters.lost += len(rows) - keep
            for op in ops:
                op.future.set_exception(RecordsUnavailable(f"the experiment database failed: {type(e).__name__}"))
            raise
        self.counters.written += len(rows)
        for op, result in zip(ops, results):
            self.counters.feedback += sum(isinstance(r, Feedback) for r in result)
            op.future.set_result(result)

    def _hashed(self, row: tuple) -> tuple:
        client = row[4]
        if client is not None:  # keyed, so a hash of a guessable id (a user name) cannot be reversed by trying
            client = hashlib.blake2b(client.encode("utf-8", "surrogatepass"), key=self._client_key,
                                     digest_size=8).hexdigest()
        return row[:4] + (client,) + row[5:]

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, stop the writer and close the connections; later records are dropped."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify()
        self.start()  # a writer never started still writes what was queued
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("experiment records: the writer did not finish within %g s", timeout)
            return
        self._writer_db.drop()
        self._reader_db.drop()
