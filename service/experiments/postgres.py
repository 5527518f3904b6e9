"""The PostgreSQL backend of the experiment records: one database shared by several gateway replicas.

It is a `records.Backend` (psycopg 3 connections, `%s` placeholders) with what sharing needs:
- **READ COMMITTED.** `INSERT ... ON CONFLICT DO NOTHING` then waits for another gateway's transaction on
  the same key and sees its row once committed, so feedback given twice, to two gateways, is taken once;
  REPEATABLE READ or SERIALIZABLE would raise a serialisation failure instead.
- **Locks by name.** `lock()` takes transaction-scoped advisory locks: schema creation by two gateways
  starting at once (concurrent `CREATE TABLE IF NOT EXISTS` can fail on PostgreSQL's catalog), and an
  answer's feedback against a shadow record of that answer written by another gateway at the same moment.
- **The password stays secret.** `repr()` and every error from connecting show the URL without it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

SCHEMES = ("postgres://", "postgresql://")


def redact(url: str) -> str:
    """`url` with its password (if any) replaced by `***`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def lock_key(name: str) -> int:
    """A signed 64-bit advisory-lock key for a name (the same in every process)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)


@dataclass(frozen=True)
class PostgresBackend:
    """Connections to the database at `url` (postgresql://USER[:PASSWORD]@HOST[:PORT]/DB[?OPTIONS]; libpq also
    reads PGPASSWORD and ~/.pgpass, which keep the password out of the configuration)."""
    url: str = field(repr=False)
    connect_timeout_s: int = 5  # a gateway whose database is unreachable answers 503 within this, not a TCP timeout

    shared = True  # other gateways write to the same database (records.ExperimentRecords waits for their records)

    def __repr__(self) -> str:
        return f"PostgresBackend({redact(self.url)!r})"

    def connect(self) -> psycopg.Connection:
        try:
            conn = psycopg.connect(self.url, connect_timeout=self.connect_timeout_s)
        except psycopg.Error as e:  # libpq quotes parts of the URL in some messages: never its password
            secret = urlsplit(self.url).password
            message = str(e).replace(secret, "***") if secret else str(e)
            raise psycopg.OperationalError(f"{redact(self.url)}: {message}") from None
        conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
        return conn

    def sql(self, statement: str) -> str:
        return statement.replace("%", "%%").replace("?", "%s")

    def lock(self, db: Any, names: list[str]) -> None:
        # in sorted order, so two transactions that lock several names cannot deadlock on each other
        db.many("SELECT pg_advisory_xact_lock(?)", [(key,) for key in sorted({lock_key(n) for n in names})])
