"""Where things live on disk: one meaning of `$BENTOML_HOME` for the store, the server and the tools.

BentoML's own rule: `$BENTOML_HOME` when it is set and not empty, else `~/bentoml`. Every path the
project keeps under it (the model store, training runs, CPU slots, the service's state) starts here.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

HOME_ENV = "BENTOML_HOME"


def bentoml_home(home: str | os.PathLike | None = None) -> Path:
    """`home` if given, else `$BENTOML_HOME` (an empty value counts as unset), else `~/bentoml`; absolute."""
    if home is None or str(home) == "":
        home = os.environ.get(HOME_ENV) or Path.home() / "bentoml"
    return Path(home).expanduser().resolve()


def models_dir(home: str | os.PathLike | None = None) -> Path:
    """BentoML's model store, where checkpoints live: `home`'s when given, else the served bento's own
    (`served_bento_models`) when there is one, else `$BENTOML_HOME`'s."""
    if home is None or str(home) == "":
        own = served_bento_models()
        if own is not None:
            return own
    return bentoml_home(home) / "models"


def served_bento_models() -> Path | None:
    """The model store of the bento this process serves, when the bento carries its models, else None.

    A bento built with its checkpoints (`effnet build --pack-models`) holds them in its own `models/`
    folder once exported or containerized, and BentoML's loader then points its model store there
    instead of `$BENTOML_HOME/models` (`bentoml._internal.service.loader._load_bento`, 1.4.30), in
    every process of the server. It sets that store as an override of its container's default, which
    is what is read here; BentoML is not imported for it: a process that has not imported it serves no
    bento. In an image made by `bentoml containerize`, a process that BentoML's loader did not start
    (`python -m cli.worker`) finds the bento's store through `$BENTO_PATH`, which the image sets.
    """
    bento = os.environ.get("BENTO_PATH")  # set in an image made by `bentoml containerize`
    if bento and any((Path(bento) / "models").glob("*/*")):
        # a process of the image that BentoML's loader did not start (`python -m cli.worker`) reads the
        # bento's store all the same
        own = Path(bento, "models").resolve()
    else:
        own = None
    if "bentoml" not in sys.modules:
        return own
    try:
        from bentoml._internal.configuration.containers import BentoMLContainer

        override = BentoMLContainer.model_store._override  # a sentinel unless a bento's own store is set
    except (ImportError, AttributeError):  # another BentoML layout: the store of $BENTOML_HOME, as before
        return own
    path = getattr(override, "_path", None)
    return Path(path).resolve() if isinstance(path, Path) else own


STATE_ENV = "EFFNET_STATE_DIR"


def state_dir(home: str | os.PathLike | None = None) -> Path:
    """Everything the service writes for itself: live route changes, the admin token and audit log, the
    engine caches it builds when the checkpoint's folder cannot be written. `$EFFNET_STATE_DIR` when set,
    else `$BENTOML_HOME/effnet-state`.

    Apart from the model store (`models_dir`), so that the store can be mounted read-only; inside
    `$BENTOML_HOME` by default, so that servers of different stores keep different state with no setting
    (BentoML writes its metrics folder under `$BENTOML_HOME` anyway, so that folder is writable).
    """
    given = os.environ.get(STATE_ENV)
    if given and home is None:
        return Path(given).expanduser().resolve()
    return bentoml_home(home) / "effnet-state"
