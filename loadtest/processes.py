"""Processes a load test starts, and stops again whatever happens.

Every child is started in its own session (process group), so stopping it reaches the processes it
started in turn (BentoML's workers, for one) and nothing else.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .service_api import wait_ready

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the OS picks it; tiny race accepted: we bind right after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> int | None:
    """SIGTERM the process group `proc` leads (SIGINT first for servers that drain on it), then SIGKILL."""
    if proc.poll() is not None:
        return proc.returncode
    for sig, wait in ((signal.SIGINT, timeout / 2), (signal.SIGTERM, timeout / 2), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        try:
            return proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    return proc.poll()


def private_bentoml_home(store_home: Path, prefix: str = "effnet-lt-home-") -> Path:
    """A fresh BENTOML_HOME whose `models` is the real store's: BentoML wipes
    `$BENTOML_HOME/prometheus_multiproc_dir` at start, so the load-test server must not
    share a home with `make serve` or with another test server, yet it must serve the same models."""
    home = Path(tempfile.mkdtemp(prefix=prefix))
    models = Path(store_home) / "models"
    models.mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(models.resolve(), target_is_directory=True)
    return home


class ServiceProcess:
    """`effnet serve --config FILE --port P` on 127.0.0.1, in its own BENTOML_HOME; ready or raises."""

    def __init__(self, config: str | None, store_home: Path, port: int | None = None, log_path: Path | None = None,
                 ready_timeout: float = 180.0, extra_env: dict[str, str] | None = None) -> None:
        self.config = config
        self.store_home = Path(store_home)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.ready_timeout = ready_timeout
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen | None = None
        self.home: Path | None = None

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "cli.main", "serve", "--port", str(self.port), "--host", "127.0.0.1"]
        if self.config:
            cmd += ["--config", str(self.config)]
        return cmd

    def start(self) -> "ServiceProcess":
        self.home = private_bentoml_home(self.store_home)
        # The project first, then whatever the caller's PYTHONPATH held (packages installed with --target).
        pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "BENTOML_HOME": str(self.home), "PYTHONPATH": pythonpath, **self.extra_env}
        self.log = open(self.log_path, "wb") if self.log_path else open(self.home / "serve.log", "wb")
        self.proc = subprocess.Popen(self.command(), cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            wait_ready(self.url, timeout=self.ready_timeout, proc=self.proc)
        except BaseException as e:
            tail = self.log_tail()
            self.stop()
            if isinstance(e, (RuntimeError, TimeoutError)):
                raise RuntimeError(f"{e}\n--- service log (tail) ---\n{tail}") from None
            raise
        return self

    def log_tail(self, n: int = 3000) -> str:
        try:
            self.log.flush()
            return Path(self.log.name).read_bytes()[-n:].decode(errors="replace")
        except (OSError, ValueError):
            return ""

    def pids(self) -> list[int]:
        """The server and every process it started (for the CPU-share figures)."""
        import psutil

        if self.proc is None or self.proc.poll() is not None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            return [root.pid] + [c.pid for c in root.children(recursive=True)]
        except psutil.Error:
            return []

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=20)
            self.proc = None
        if getattr(self, "log", None):
            self.log.close()
        if self.home is not None:
            shutil.rmtree(self.home, ignore_errors=True)  # the symlinked store itself is untouched
            self.home = None

    def __enter__(self) -> "ServiceProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_for(predicate, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False
