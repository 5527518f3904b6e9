import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Tests are small; two threads per process keeps parallel servers from oversubscribing 2 cores.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def bentoml_home(tmp_path, monkeypatch):
    """A private BENTOML_HOME per test: stores and metrics never collide between tests."""
    home = tmp_path / "bentoml"
    home.mkdir()
    monkeypatch.setenv("BENTOML_HOME", str(home))
    return home
