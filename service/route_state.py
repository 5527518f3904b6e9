"""Live route changes that outlive a restart.

`PATCH /routes/NAME` changes a route while serving. Without this module a restart (a deploy, a
crash, a reboot) would quietly put a canary that had been ramped to 50% back to the file's 5%. Each
accepted change is written to a small JSON file, and the next start serves it again.

The configuration file stays the source of truth: a saved change applies only while the file's
own entry for that route is what it was when the change was made. Edit the route in the file and
the file wins, with a log line that says so. `effnet serve --reset-routes` forgets every saved
change; `server.route_changes: memory` never saves them.

The file lives in the service's state folder (`store.paths.state_dir`: `$EFFNET_STATE_DIR`, else
`$BENTOML_HOME/effnet-state`) under `route-changes/`, one per configuration file (keyed by its absolute
path), so servers on different stores or configurations never share changes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from store.durable import write_atomic
from store.paths import bentoml_home, state_dir

from .config import RouteConfig

logger = logging.getLogger("effnet.routes")
VERSION = 1


def state_path(config_source: str, home: str | os.PathLike | None = None) -> Path:
    """Where the changes of the configuration at `config_source` are kept."""
    src = Path(config_source).resolve()
    key = hashlib.sha256(str(src).encode()).hexdigest()[:12]
    return state_dir(home) / "route-changes" / f"{src.stem}-{key}.json"


def legacy_path(path: Path, home: str | os.PathLike | None = None) -> Path:
    """Where a server without a state folder kept the same file (`$BENTOML_HOME/effnet/route-changes/`):
    read when the state folder has none, so an upgrade does not quietly put a ramped canary back."""
    return bentoml_home(home) / "effnet" / "route-changes" / path.name


def route_dict(r: RouteConfig) -> dict:
    """A route as the configuration file and PATCH write it (weights already normalised)."""
    return {"split": dict(r.split),
            "shadow": {"variant": r.shadow.variant, "fraction": r.shadow.fraction} if r.shadow else None,
            **({"fallback": r.fallback} if r.fallback else {}), **({"control": r.control} if r.control else {}),
            **({"policy": r.policy.as_dict()} if r.policy else {})}


def same_route(a: dict, b: dict) -> bool:
    """Equal as route_dict()s, weights and fractions to 1e-9: a client that sends back the weights that
    GET /routes showed (normalised, then normalised again) restores the file's route."""
    def key(d):
        sh = d.get("shadow")
        return (sorted((d.get("split") or {}).items()), (sh or {}).get("variant"), (sh or {}).get("fraction", 0))
    try:
        (sa, va, fa), (sb, vb, fb) = key(a), key(b)
        return ([v for v, _ in sa] == [v for v, _ in sb] and va == vb and abs(fa - fb) < 1e-9
                and all(abs(x - y) < 1e-9 for (_, x), (_, y) in zip(sa, sb)))
    except (AttributeError, TypeError):  # a hand-edited file: not the same
        return False


def load(path: Path) -> dict[str, dict]:
    """route -> {"base", "route", "changed_at"}; a missing file is no change, an unreadable one is
    logged and ignored (the file's routes are then served)."""
    if not path.exists() and legacy_path(path).is_file():
        logger.warning("reading saved route changes from %s; the next change saves them in %s", legacy_path(path), path)
        path = legacy_path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        logger.error("saved route changes in %s cannot be read (%s); serving the configuration file's routes", path, e)
        return {}
    routes = data.get("routes") if isinstance(data, dict) and data.get("version") == VERSION else None
    if not isinstance(routes, dict):
        logger.error("saved route changes in %s are not in the expected form; serving the configuration file's "
                     "routes", path)
        return {}
    return {k: v for k, v in routes.items()
            if isinstance(v, dict) and isinstance(v.get("base"), dict) and isinstance(v.get("route"), dict)}


def save(path: Path, entries: dict[str, dict], config_source: str) -> None:
    """Write all saved changes at once, atomically: a crash mid-write leaves the old file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    legacy_path(path).unlink(missing_ok=True)  # from now on the state folder's file is the one
    if not entries:
        path.unlink(missing_ok=True)
        return
    body = json.dumps({"version": VERSION, "config": str(Path(config_source).resolve()), "routes": entries},
                      indent=2, sort_keys=True)
    write_atomic(path, body)


def forget(config_source: str) -> Path | None:
    """Delete the saved changes of a configuration; the path if there were any."""
    path = state_path(config_source)
    gone = None
    for p in (legacy_path(path), path):
        if p.exists():
            p.unlink()
            gone = p
    return gone
