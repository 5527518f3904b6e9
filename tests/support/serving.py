"""Helpers for tests and the benchmarks: tiny fake checkpoints and a real `bentoml serve` subprocess.

Every server gets its own BENTOML_HOME and port: `bentoml serve` wipes
`$BENTOML_HOME/prometheus_multiproc_dir` at start, so two servers sharing a home lose each other's
metrics.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

from loadtest.processes import free_port
from store.fashion_mnist import CLASSES as FASHION_CLASSES  # noqa: F401 (the tests import it from here)


def make_checkpoint(home: Path, name: str, variant: str, classes: list[str], resolution: int,
                    grayscale: bool = False, seed: int = 0, *, dataset: str = "fake",
                    calibrate_on: Sequence[bytes] | None = None) -> str:
    """A checkpoint with random weights whose answers differ from image to image; returns its tag.

    Untrained networks answer every class alike (zero-initialised BN gammas and head), which would make
    order checks vacuous: BN gets unit-scale gammas, the head a scaled normal init, and BN statistics
    are recomputed (one cumulative pass in training mode) on random batches, or on `calibrate_on`
    (encoded images, decoded and cropped as the service does), which gives each of those images its
    own, decisive answer.
    """
    import torch

    from models import count_macs, count_params, create_model, model_config
    from store import InputNormalizer, Manifest, resize_crop, save_checkpoint

    torch.manual_seed(seed)
    model = create_model(variant, num_classes=len(classes))
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            m.momentum = None  # cumulative average over the calibration batches
            m.reset_running_stats()
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    torch.nn.init.normal_(last.weight, std=3.0 / last.in_features ** 0.5)
    man = Manifest(variant=variant, config=model_config(variant).to_dict(), num_classes=len(classes),
                   classes=list(classes), dataset=dataset, resolution=resolution, grayscale=grayscale,
                   mean=[0.5] * 3 if grayscale else [0.485, 0.456, 0.406],
                   std=[0.5] * 3 if grayscale else [0.229, 0.224, 0.225],
                   metrics={"top1": 0.1 + seed / 100}, params=count_params(model),
                   training={"fake": "random weights, BatchNorm statistics from "
                             + ("the images it is tested on" if calibrate_on else "random batches")})
    if calibrate_on:
        from loadtest.offline import decode

        x = torch.cat([resize_crop(decode(data, man), man) for data in calibrate_on])
        batches = [InputNormalizer(man)(x)]
    else:
        batches = [torch.rand(16, 3, resolution, resolution) * 4 - 2 for _ in range(3)]
    model.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    model.eval()
    man.macs = count_macs(model, resolution)
    return save_checkpoint(model, man, name=name, home=home)


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class Server:
    """`bentoml serve service.app:Gateway` in a subprocess (own session, own BENTOML_HOME and port)."""

    def __init__(self, home: Path, config: Path, port: int | None = None, log: Path | None = None) -> None:
        self.home, self.config = Path(home), Path(config)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log or self.home / "server.log"
        self.proc: subprocess.Popen | None = None
        self.killed = False  # whether stop() had to SIGKILL what SIGTERM did not stop

    def start(self) -> "Server":
        from cli.serve import serve_command, server_env

        env = {**server_env(self.home), "EFFNET_SERVE_CONFIG": str(self.config)}
        self._logf = open(self.log, "wb")
        self.proc = subprocess.Popen(
            serve_command("127.0.0.1", self.port), env=env, stdout=self._logf, stderr=subprocess.STDOUT, start_new_session=True,
        )
        return self

    def wait(self, path: str = "/readyz", timeout: float = 240) -> int:
        """Poll `path` until it answers 200 (or, for /livez-style waits, anything); returns the last status."""
        import httpx

        deadline, status = time.monotonic() + timeout, 0
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; log:\n{self.log.read_text()[-4000:]}")
            try:
                status = httpx.get(self.url + path, timeout=10).status_code
                if status == 200:
                    return status
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.url}{path} not 200 after {timeout}s (last {status}); log:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # our own session: the arbiter and its workers
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.killed = True
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if getattr(self, "_logf", None):
            self._logf.close()
        import shutil

        from cli.serve import server_tmp_dir

        shutil.rmtree(server_tmp_dir(self.home), ignore_errors=True)  # a test store is never served again

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
