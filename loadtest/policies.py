"""The policy phases: the budget and cascade policies under the same load as the fixed variants.

    serving config = the run's config + two routes over the fashion variants:
        fashion-budget:  policy budget, every fashion variant a candidate; each Locust user sends
                         `X-Latency-Budget-Ms: budget_ms`
        fashion-cascade: policy cascade, stages compact -> b0 (or the route's first and last variants),
                         thresholds chosen by `effnet cascade fit` on the stages' validation split
                         (the test split, with its warning, for checkpoints trained without one)
    Locust PolicyUsers name the route (no client id: a policy route is not sticky) at each user count
    the offline curve: the cascade over its threshold on the images the load test sends (cascade_fit.curve)

The thresholds come from the project's own command, in a subprocess (as the experiment's weak variant
is trained): the fit is set-up, not load, and its choice stays in one place.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from .processes import ROOT

BUDGET_ROUTE = "fashion-budget"
CASCADE_ROUTE = "fashion-cascade"
POLICY_NAMES = ("budget", "cascade")
# The stages the issue names: the cheapest fashion variant first, the strongest seed variant last.
FIRST_STAGE, LAST_STAGE = "compact", "b0"


def policy_of(route: dict) -> str | None:
    """"budget" or "cascade" for a route of GET /routes with such a policy, else None."""
    p = route.get("policy")
    name = next(iter(p), None) if isinstance(p, dict) else p
    return name if name in POLICY_NAMES else None


def cascade_stages(split: list[str]) -> list[str]:
    """Two stages among the route's variants: compact then b0 where served, else its first then its last."""
    if len(split) < 2:
        raise ValueError(f"a cascade needs two variants on the route, it has {split}")
    first = FIRST_STAGE if FIRST_STAGE in split else split[0]
    rest = [v for v in split if v != first]
    return [first, LAST_STAGE if LAST_STAGE in rest else rest[-1]]


def policy_config(base: dict, route: str, budget_ms: float, thresholds_file: str,
                  leave_out: tuple[str, ...] = ()) -> dict:
    """The serving config `base` with the two policy routes over the live variants of `route`."""
    cfg = json.loads(json.dumps(base))  # a deep copy of plain YAML data
    split = cfg["routes"][route]["split"]
    live = [v for v, w in (split.items() if isinstance(split, dict) else ((v, 1) for v in split))
            if w and v not in leave_out]
    cfg["routes"][BUDGET_ROUTE] = {"split": {v: 1.0 for v in live},
                                   "policy": {"budget": {"default_ms": float(budget_ms)}}}
    stages = cascade_stages(live)
    cfg["routes"][CASCADE_ROUTE] = {"split": {v: 1.0 for v in stages},
                                    "policy": {"cascade": {"stages": stages, "thresholds_file": thresholds_file}}}
    return cfg


def write_policy_config(config: str | None, route: str, budget_ms: float, folder: Path,
                        leave_out: tuple[str, ...] = ()) -> Path:
    """`policy_config` of the run's config file (None: the service's default), written into `folder`."""
    from service.config import CONFIG_ENV, DEFAULT_CONFIG

    base = yaml.safe_load(Path(config or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG).read_text())
    if route not in (base.get("routes") or {}):
        raise ValueError(f"the policy phases' route {route!r} is not in the serving config")
    path = Path(folder) / "serve-policies.yaml"
    path.write_text(yaml.safe_dump(policy_config(base, route, budget_ms, f"cascade-{CASCADE_ROUTE}.yaml",
                                                 leave_out), sort_keys=False))
    return path


def fit_thresholds(config: Path, store_home: Path, data: str | None = None, log=print,
                   timeout_s: float = 600.0) -> dict:
    """`effnet cascade fit` of the cascade route in `config`; its record (thresholds, split, expected figures)
    and the seconds it took."""
    t = time.monotonic()
    env = {**os.environ, "BENTOML_HOME": str(store_home), "PYTHONPATH": str(ROOT)}
    out = Path(config).parent / f"cascade-{CASCADE_ROUTE}.yaml"
    args = ["cascade", "fit", CASCADE_ROUTE, "--config", str(config), "--out", str(out)]
    proc = subprocess.run([sys.executable, "-m", "cli.main", *args, *(["--data", data] if data else [])], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"effnet cascade fit failed ({proc.returncode}): {proc.stderr[-2000:]}")
    record = yaml.safe_load(out.read_text())
    record["fit_s"] = round(time.monotonic() - t, 1)
    record["warnings"] = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    log(f"cascade {' -> '.join(record['stages'])}: thresholds {record['thresholds']} ({record['split']} split, "
        f"{record['fit_s']:.0f} s)")
    return record


def offline_curve(stages: list[str], variants: dict, images, store_home: Path, points: int = 50) -> dict:
    """The cascade over its threshold on the labelled `images` the load test sends: (accuracy, mean MACs) per
    threshold, from each stage's calibrated probabilities (the workers' own: logits / temperature)."""
    import torch

    from engines import load_engine
    from store import resize_crop
    from training.cascade_fit import curve

    from .offline import decode

    labelled = [im for im in images if im.labelled]
    probs, costs = [], []
    for stage in stages:
        engine, man = load_engine(variants[stage]["model"], threads=os.cpu_count() or 1, home=str(store_home))
        rows = []
        for start in range(0, len(labelled), 64):
            x = torch.cat([resize_crop(decode(im.data, man), man) for im in labelled[start:start + 64]])
            rows.append(torch.softmax(engine(x).double() / man.temperature, dim=1).numpy())
        probs.append(np.concatenate(rows))
        costs.append(float(variants[stage].get("macs") or man.macs))
    labels = np.array([min(im.labels) for im in labelled])
    return {"stages": stages, "images": len(labelled), "costs": costs,
            "points": [f.as_dict() for f in curve(probs, labels, costs, points=points)]}
