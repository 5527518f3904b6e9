"""Where the experiment records live: the `Backend` protocol, the embedded SQLite default and `open_backend`,
which picks one from the configuration (`server.experiments_db`: empty, a path, `sqlite:///PATH` or a
`postgresql://` URL, whose backend is service/experiments/postgres.py)."""
from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from store.paths import state_dir

DB_FILE = "experiments.sqlite3"


class Backend(Protocol):
    """A database for the records: new DB-API 2 connections (transactions ended by commit or rollback, each
    connection used by one thread at a time), the driver's placeholder spelling and locks by name."""
    shared: bool  # whether other processes' writers (other gateways) write to it

    def connect(self) -> Any: ...

    def sql(self, statement: str) -> str: ...  # `statement`, written with `?` placeholders, in the driver's style

    def lock(self, db: Any, names: list[str]) -> None: ...  # held by `db`'s transaction until it ends


@dataclass(frozen=True)
class SQLiteBackend:
    """The embedded default: one file, WAL mode (readers never wait for the writer), `synchronous=FULL` so that
    a committed transaction survives a power cut, not only a killed process."""
    path: Path
    busy_timeout_ms: int = 5000
    shared = False  # one gateway's: its writer wrote every record before any feedback that follows it

    def connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():  # client hashes and labels: readable by the server's user only
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_ms / 1000, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    def sql(self, statement: str) -> str:
        return statement

    def lock(self, db: Any, names: list[str]) -> None:
        pass  # a writing transaction holds the whole file


def open_backend(where: str | os.PathLike | Backend | None = None, busy_timeout_ms: int = 5000) -> Backend:
    """A backend given one, a database URL, or a path to an SQLite file; by default `experiments.sqlite3` in
    the state folder (store.paths.state_dir)."""
    if where is not None and hasattr(where, "connect"):
        return where  # type: ignore[return-value]
    if isinstance(where, str) and where.startswith(("postgres://", "postgresql://")):
        from .postgres import PostgresBackend  # psycopg is imported only by servers that use it
        return PostgresBackend(where)
    if isinstance(where, str) and where.startswith("sqlite:"):
        where = where.removeprefix("sqlite:").removeprefix("//")
    return SQLiteBackend(Path(where) if where else state_dir() / DB_FILE, busy_timeout_ms)
