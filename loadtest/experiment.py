"""The experiment phase: an A/B test on a split route that labelled traffic drives to a decision.

    serving config = the run's config + a deliberately weaker variant in the route's split, the route's
                     `control` (b0 where it serves one), and a fresh experiment database in the run folder
    Locust SplitUsers send the route's images and POST /feedback for `feedback_share` of the answers
    every `poll_s`: GET /experiments/ROUTE, one point of the trajectory
    stop once the weak variant's status against the control is decided, or at `experiment_s`

The weak variant is a checkpoint trained on a tenth of an epoch (`WEAK_TRAIN`): it exists only to be
found worse, so `ensure_weak_checkpoint` trains it once into the store (about 40 s on 2 cores) and
later runs reuse it. Nothing here fits anything on the labelled traffic: it only measures.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from .processes import ROOT

WEAK_VARIANT = "weak"  # its name in the serving config and in every report
WEAK_MODEL = "compact-weak-fashion-mnist"  # its store name
# compact on 6,000 of Fashion-MNIST's 60,000 training images, one epoch: about 72% top-1 against b0's 86%.
WEAK_TRAIN = ("--variant", "compact", "--data", "fashion-mnist", "--recipe", "quick", "--limit-train", "6000",
              "--epochs", "1", "--skip-existing", "--no-progress")
UNDECIDED = "collecting"


def ensure_weak_checkpoint(store_home: Path, name: str = WEAK_MODEL, log=print, timeout_s: float = 900.0) -> float:
    """Train the weak variant into the store as `name` unless it is there; the seconds it took (0: stored)."""
    if (Path(store_home) / "models" / name.split(":")[0] / "latest").is_file():
        return 0.0
    t = time.monotonic()
    log(f"training the experiment's weak variant {name} (once; about 40 s on 2 cores) ...")
    env = {**os.environ, "BENTOML_HOME": str(store_home), "PYTHONPATH": str(ROOT)}
    args = [*WEAK_TRAIN, "--name", name.split(":")[0]]
    proc = subprocess.run([sys.executable, "-m", "cli.main", "train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"training the weak variant failed ({proc.returncode}): {proc.stderr[-2000:]}")
    took = time.monotonic() - t
    log(f"weak variant {name}: trained in {took:.0f} s")
    return took


def choose_control(route: dict) -> str:
    """The route's own control, else b0 where it serves it, else its heaviest variant."""
    split = route.get("split") or {}
    if route.get("control"):
        return route["control"]
    if "b0" in split:
        return "b0"
    return max(split, key=split.get)  # the first of equals, in the config's order


def experiment_config(base: dict, route: str, weak_model: str, db_path: Path) -> dict:
    """The serving config `base` with the experiment on `route`: the weak variant in its split at the control's
    weight (served eagerly: only its answers matter), the control named, records in `db_path`."""
    cfg = json.loads(json.dumps(base))  # a deep copy of plain YAML data
    r = cfg["routes"][route]
    control = choose_control(r)
    r["control"] = control
    r["split"] = {**r["split"], WEAK_VARIANT: r["split"][control]}
    cfg["variants"][WEAK_VARIANT] = {"model": weak_model if ":" in weak_model else f"{weak_model}:latest",
                                     "engine": "torch"}
    cfg.setdefault("server", {})["experiments_db"] = str(db_path)
    return cfg


def write_experiment_config(config: str | None, route: str, weak_model: str, folder: Path) -> Path:
    """`experiment_config` of the run's config file (None: the service's default), written into `folder`."""
    from service.config import CONFIG_ENV, DEFAULT_CONFIG

    base = yaml.safe_load(Path(config or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG).read_text())
    if route not in (base.get("routes") or {}):
        raise ValueError(f"the experiment route {route!r} is not in the serving config")
    path = folder / "serve-experiment.yaml"
    path.write_text(yaml.safe_dump(experiment_config(base, route, weak_model, folder / "experiments.sqlite3"),
                                   sort_keys=False))
    return path


def read_experiment(url: str, route: str, timeout: float = 10.0) -> dict | None:
    """GET /experiments/ROUTE, or None where the route runs no experiment."""
    try:
        with urllib.request.urlopen(f"{url}/experiments/{route}", timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


def point(result: dict, elapsed_s: float) -> dict:
    """One look at the experiment: per served variant its counts and status against the control."""
    served = [v for v in result.get("variants") or [] if v.get("role") != "shadow"]
    return {"t_s": round(elapsed_s, 1), "requests": sum(v["requests"] for v in served),
            "labelled": sum(v["labelled"] for v in served),
            "variants": {v["variant"]: {"requests": v["requests"], "labelled": v["labelled"], "correct": v["correct"],
                                        "status": (v.get("vs_control") or {}).get("status", "control")}
                         for v in served}}


def decided(look: dict, variant: str) -> bool:
    return look["variants"].get(variant, {}).get("status", UNDECIDED) not in (UNDECIDED, "control")


class Watcher:
    """Looks at the experiment every call, keeps the trajectory, says when `variant` is decided."""

    def __init__(self, url: str, route: str, variant: str) -> None:
        self.url, self.route, self.variant = url, route, variant
        self.started = time.monotonic()
        self.trajectory: list[dict] = []

    def __call__(self) -> bool:
        try:
            result = read_experiment(self.url, self.route)
        except (OSError, ValueError):  # a slow answer under load: the next look will do
            return False
        if result is None:
            return False
        self.trajectory.append(point(result, time.monotonic() - self.started))
        return decided(self.trajectory[-1], self.variant)
