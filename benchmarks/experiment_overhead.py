"""What recording an experiment costs a request (not a test): /classify p50 with and without a `control`.

    .venv/bin/python -m benchmarks.experiment_overhead [--store HOME] [--rounds 6] [--per-round 150]

Two real servers on one copy of the store, the same fashion variants and route, one of them running an
experiment on it (`control: b0`: every answer queued for the experiment database). One client sends
b0 a 28x28 PNG, alternating between the two servers request by request, so both see the same machine
at the same moments; each round's medians are compared, and the median of the per-round differences is
the figure. Writes JSON with the machine and date (`--record`).
"""
from __future__ import annotations

import argparse
import io
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from store.paths import bentoml_home
from tests.support.serving import Server, write_config

VARIANTS = {"b0": "b0-fashion-mnist:latest", "mec": "mec-out-e3-fashion-mnist:latest",
            "compact": "compact-fashion-mnist:latest"}


def _config(path: Path, control: bool) -> Path:
    route = {"split": {"b0": 0.5, "mec": 0.25, "compact": 0.25}, **({"control": "b0"} if control else {})}
    return write_config(path, {"default_route": "fashion", "variants": {v: {"model": m} for v, m in VARIANTS.items()},
                               "routes": {"fashion": route}})


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default=None, help="BENTOML_HOME with the fashion checkpoints (copied; default: "
                                                 "$BENTOML_HOME or ~/bentoml)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--per-round", type=int, default=150, help="requests to each server per round")
    ap.add_argument("--record", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="effnet-exp-overhead-"))
    home = work / "bentoml"
    shutil.copytree(bentoml_home(args.store) / "models", home / "models", symlinks=True)
    servers = {"off": Server(home, _config(work / "off.yaml", False)),
               "on": Server(home, _config(work / "on.yaml", True))}
    image = _png()
    rounds: list[dict] = []
    try:
        for s in servers.values():
            s.start()
        for s in servers.values():
            s.wait("/readyz")
        clients = {k: httpx.Client(base_url=s.url, timeout=30) for k, s in servers.items()}

        def one(k: str) -> float:
            t0 = time.perf_counter()
            r = clients[k].post("/classify", files={"image": ("x.png", image, "image/png")}, data={"variant": "b0"})
            r.raise_for_status()
            return (time.perf_counter() - t0) * 1000

        for _ in range(30):  # warm-up
            one("off"), one("on")
        for i in range(args.rounds):
            lat = {"off": [], "on": []}
            for _ in range(args.per_round):
                for k in ("off", "on") if i % 2 == 0 else ("on", "off"):
                    lat[k].append(one(k))
            row = {k: {"p50_ms": round(statistics.median(v), 3), "p90_ms": round(float(np.percentile(v, 90)), 3)}
                   for k, v in lat.items()}
            row["p50_diff_ms"] = round(row["on"]["p50_ms"] - row["off"]["p50_ms"], 3)
            rounds.append(row)
            print(f"round {i + 1}: p50 off {row['off']['p50_ms']:.2f} ms, on {row['on']['p50_ms']:.2f} ms, "
                  f"difference {row['p50_diff_ms']:+.2f} ms")
        recorded = clients["on"].get("/experiments/fashion").json()
    finally:
        for s in servers.values():
            s.stop()
        shutil.rmtree(work, ignore_errors=True)
    diff = statistics.median(r["p50_diff_ms"] for r in rounds)
    result = {"what": "/classify p50 with an experiment recording every answer, against none", "rounds": rounds,
              "p50_diff_ms_median": round(diff, 3),
              "recorded_requests": sum(v["requests"] for v in recorded["variants"] if v["role"] != "shadow"),
              "machine": {"host": platform.node(), "cpu": platform.processor() or platform.machine()},
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    print(f"median over {len(rounds)} rounds of the p50 difference (on - off): {diff:+.2f} ms; the experiment "
          f"recorded {result['recorded_requests']} answers")
    if args.record:
        Path(args.record).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
