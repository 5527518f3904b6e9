"""The client libraries' own virtual environment, `.venv-clients/` (`make clients`, which `make setup` runs).

`tritonclient[http]` and `kserve` are the clients users of the Open Inference Protocol already have;
kserve pins its own fastapi, psutil and protobuf, which must not replace the service's under BentoML, so
they live in a venv of their own and the tests run their client code there, in a subprocess.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv-clients"
PACKAGES = ("tritonclient", "kserve")  # what `make clients` installs, as the scripts import them


def python() -> Path:
    """The clients' interpreter; the calling test is skipped, saying why, where the venv is not there."""
    import pytest

    exe = VENV / "bin" / "python"
    if not exe.exists():
        pytest.skip(f"{VENV} does not exist: `make clients` (run by `make setup`) creates it with the "
                    "Open Inference Protocol clients (tritonclient[http], kserve)")
    return exe


def run(script: str, *args: str, timeout: float = 120) -> Any:
    """Run `script` with the clients' python and `args` as sys.argv[1:]; returns what it prints as JSON."""
    done = subprocess.run([str(python()), "-c", script, *args], capture_output=True, text=True, timeout=timeout, check=False,
                          cwd=ROOT)
    if done.returncode != 0:
        raise AssertionError(f"the client script failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":  # `python -m tests.support.clients_venv`: whether the clients import
    print(run("import json, tritonclient.http, kserve; print(json.dumps('ok'))") if (VENV / "bin").exists()
          else f"no {VENV}", file=sys.stdout)
