"""`bentoml build` works offline with the repository's bentofile (Docker cannot run here)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_bentoml_build_packs_the_service(tmp_path):
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home"), "BENTOML_DO_NOT_TRACK": "true"}
    r = subprocess.run([sys.executable, "-m", "bentoml", "build", "-f", "bentofile.yaml", "."], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    bentos = list((tmp_path / "home" / "bentos" / "effnet-serving").glob("*/src"))
    assert len(bentos) == 1
    src = bentos[0]
    for f in ("service/app.py", "service/config.yaml", "store/checkpoint.py", "models/registry.py"):
        assert (src / f).is_file(), f
    assert not (src / "tests").exists()
    requirements = (src.parent / "env" / "python" / "requirements.txt").read_text()
    assert "bentoml==1.4.30" in requirements and "torch==2.14.1" in requirements
    # The engines auto picks from, and uvicorn's C parser and loop, travel with the bento too.
    for package in ("onnxruntime", "openvino", "uvloop", "httptools"):
        assert package in requirements, package


def test_uvicorn_under_bentoml_serve_picks_the_c_parser_and_loop():
    """uvicorn's "auto" picks httptools and uvloop when they are installed (pyproject.toml has them):
    5-20% more requests/s here. Fails if an install drops them."""
    import uvicorn.loops.auto as loops
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    assert AutoHTTPProtocol.__name__ == "HttpToolsProtocol"
    assert "uvloop" in loops.auto_loop_factory(use_subprocess=False).__module__
