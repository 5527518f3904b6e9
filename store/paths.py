"""Where things live on disk: one meaning of `$BENTOML_HOME` for the store, the server and the tools.

BentoML's own rule: `$BENTOML_HOME` when it is set and not empty, else `~/bentoml`. Every path the
project keeps under it (the model store, training runs, live route changes, CPU slots) starts here.
"""
from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "BENTOML_HOME"


def bentoml_home(home: str | os.PathLike | None = None) -> Path:
    """`home` if given, else `$BENTOML_HOME` (an empty value counts as unset), else `~/bentoml`; absolute."""
    if home is None or str(home) == "":
        home = os.environ.get(HOME_ENV) or Path.home() / "bentoml"
    return Path(home).expanduser().resolve()


def models_dir(home: str | os.PathLike | None = None) -> Path:
    """BentoML's model store, where checkpoints live."""
    return bentoml_home(home) / "models"
