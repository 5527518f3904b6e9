"""A real PostgreSQL server for tests: Debian's binaries, a cluster in a private folder, 127.0.0.1 only.

initdb refuses to run as root, so under root the cluster belongs to the `postgres` user and every server
command runs as it (`runuser`); its folder is made with tempfile, not under pytest's tmp_path, whose
parents are readable by root only. Local (socket) connections are trusted, for setting up; TCP connections
need the test role's password (scram-sha-256), so the password in a test's URL is a real credential.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from loadtest.processes import free_port

ROLE, PASSWORD = "effnet", "s3cret-for-tests-only"


def bin_dir() -> Path | None:
    """The newest installed PostgreSQL's bin folder (the Debian `postgresql` package), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


class PostgresServer:
    """One cluster: `start()`, `stop()` (mode "fast" or "immediate", which is a crash), `database()` for a fresh,
    empty database owned by the test role, `close()` to stop it and delete every file."""

    def __init__(self, bindir: Path) -> None:
        self.bindir, self.port = bindir, free_port()
        self.root = Path(tempfile.mkdtemp(prefix="effnet-pg-"))
        self.root.chmod(0o755)  # the server's user must reach its data folder and socket inside
        self.data, self.sockets = self.root / "data", self.root / "sockets"
        self.sockets.mkdir()
        self._as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as_owner:
            shutil.chown(self.root, "postgres")
            shutil.chown(self.sockets, "postgres")
        self._databases = 0
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-E", "UTF8", "--no-sync",
                  "--auth-local=trust", "--auth-host=scram-sha-256")
        self.start()
        self.admin(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'")

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run([*self._as_owner, str(self.bindir / tool), *args], capture_output=True, text=True,
                              timeout=60)
        if done.returncode:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stdout}{done.stderr}")

    def start(self) -> None:
        # fsync off: a test kills processes, never the machine, and the page cache outlives a process
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.sockets} -c fsync=off "
                   "-c max_connections=50 -c shared_buffers=16MB")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", options, "-w",
                  "-t", "30", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def admin(self, statement: str) -> None:
        """Run one statement as the superuser, over the trusted local socket."""
        import psycopg

        with psycopg.connect(host=str(self.sockets), port=self.port, user="postgres", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(statement)

    def url(self, database: str, password: str = PASSWORD) -> str:
        return f"postgresql://{ROLE}:{password}@127.0.0.1:{self.port}/{database}"

    def database(self) -> str:
        """The URL of a new, empty database."""
        self._databases += 1
        name = f"test{self._databases}"
        self.admin(f"CREATE DATABASE {name} OWNER {ROLE}")
        return self.url(name)

    def close(self) -> None:
        try:
            self.stop("immediate")
        except RuntimeError:
            pass  # already stopped
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres_server():
    """A running PostgreSQL for the module's tests (skipped where the `postgresql` package is not installed)."""
    bindir = bin_dir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (/usr/lib/postgresql/*/bin/initdb): `make setup` installs the "
                    "`postgresql` Debian package")
    server = PostgresServer(bindir)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A fresh database on the module's server, as a URL with the test role's password in it."""
    return postgres_server.database()
