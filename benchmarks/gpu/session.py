"""One bounded GPU session: what this project can only measure on a lent CUDA machine, in one run.

    python3 benchmarks/gpu/session.py --out DIR --budget 560

Stages, each with a deadline inside `--budget` seconds, results written to DIR as soon as they exist
(a stage that overruns is killed and the next one still runs):
1. env      GPU, driver, torch, ONNX Runtime providers.
2. probe    b0, mec and compact together, 1 short epoch on Fashion-MNIST on the GPU: a smoke test of the
            CUDA path (bf16 autocast for b0 and mec, fp16 + GradScaler for compact) and the
            images/s that size stage 3.
3. train    the full recipe (RandAugment, EMA, ...) for the three at once, with as many epochs as fit
            the budget (at most the recipe's 40); checkpoints go to the store, weights packed into DIR.
4. bench    `effnet bench --device cuda` for b0 and lite0: eager fp32, eager fp16, ONNX Runtime (where its
            CUDA provider is installed), and torch.compile with CUDA graphs (compiled in the background
            during stage 3, so here its caches are warm).
5. serve    a real `effnet serve` with b0 on a GPU worker (and compact on the CPU) in the fashion route:
            sequential and concurrent requests, /variants, the worker's metrics.
Everything the device machine lacks travels with the call (see benchmarks/gpu/README.md).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
TRIO = ("b0", "mec", "compact")
T0 = time.monotonic()


def now() -> float:
    return time.monotonic() - T0


def say(*parts) -> None:
    print(f"[{now():6.1f}s]", *parts, flush=True)


def effnet(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", *args]


def run(cmd: list[str], timeout: float, log: Path, env: dict | None = None) -> int:
    """Run to completion or kill at `timeout`; output appended to `log`. Returns rc (124: killed)."""
    say("$", " ".join(cmd), f"(timeout {timeout:.0f} s)")
    with open(log, "ab") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env or os.environ, stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True)
        try:
            return p.wait(timeout=max(1, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            p.wait()
            say("killed after", f"{timeout:.0f} s")
            return 124


def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    say("& ", " ".join(cmd))
    return subprocess.Popen(cmd, cwd=ROOT, env=env or os.environ, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(procs: dict[str, subprocess.Popen], deadline: float) -> dict[str, int]:
    rcs = {}
    for name, p in procs.items():
        try:
            rcs[name] = p.wait(timeout=max(1, deadline - now()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            p.wait()
            rcs[name] = 124
            say(name, "killed at its deadline")
    return rcs


def epoch_log(home: Path, name: str) -> list[dict]:
    f = home / "runs" / name / "train_log.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.is_file() else []


def store_rows(env: dict) -> list[dict]:
    out = subprocess.run(effnet("store", "--json"), cwd=ROOT, env=env, capture_output=True, text=True)
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError:
        return []


def write(out: Path, name: str, data) -> None:
    (out / name).write_text(json.dumps(data, indent=2, default=str) + "\n")


def save(out: Path, logs: Path, results: dict) -> None:
    """results.json and every log so far (OUT takes few files: one tarball, rewritten each time)."""
    write(out, "results.json", results)
    with tarfile.open(out / "logs.tgz", "w:gz") as tar:
        for p in sorted(logs.iterdir()):
            tar.add(p, arcname=p.name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the results")
    ap.add_argument("--budget", type=float, default=560, help="seconds for the whole session")
    ap.add_argument("--workers", type=int, default=4, help="DataLoader workers per training process")
    ap.add_argument("--batch-size", type=int, default=256, help="per training process")
    ap.add_argument("--max-epochs", type=int, default=40)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="effnet-gpu-logs-"))  # tarred into OUT/logs.tgz after each stage
    home = Path(os.environ.setdefault("BENTOML_HOME", "/tmp/effnet-gpu-home"))
    carried = ROOT / ".gpu" / "fashion-mnist"
    if carried.is_dir():  # the Debian package is not installed on the device machine
        os.environ["FASHION_MNIST_DIR"] = str(carried)
    env = dict(os.environ)
    results: dict = {"budget_s": args.budget, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    # 1) env ------------------------------------------------------------------------------------
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "cpu_count": os.cpu_count(), "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported()}
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
        info["ort_providers"] = ort.get_available_providers()
    except ImportError as e:
        info["onnxruntime"] = f"missing: {e}"
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                          "--format=csv,noheader"], capture_output=True, text=True)
    info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    results["env"] = info
    say("env", info)
    write(out, "results.json", results)
    if not torch.cuda.is_available():
        say("no CUDA GPU: nothing to do here")
        return 1

    # 2) probe: 100 steps each, the three at once -------------------------------------------------
    common = ["--data", "fashion-mnist", "--recipe", "full", "--batch-size", str(args.batch_size),
              "--workers", str(args.workers), "--threads", "2", "--no-progress"]  # 3 trainers + their workers share 16 cores
    probe_amp = {"b0": "bf16", "mec": "bf16", "compact": "fp16"}
    procs = {v: start(effnet("train", "--variant", v, *common, "--epochs", "1", "--limit-train",
                             str(100 * args.batch_size), "--limit-val", "1000", "--bn-recalibrate", "5",
                             "--amp", probe_amp[v], "--name", f"probe-{v}"), logs / f"train-{v}.log", env)
             for v in TRIO}
    rcs = finish(procs, now() + 150)
    probe = {}
    for v in TRIO:
        rows = epoch_log(home, f"probe-{v}")
        probe[v] = {"rc": rcs[v], "amp": probe_amp[v], **(rows[-1] if rows else {})}
    results["probe"] = probe
    save(out, logs, results)
    say("probe", {v: (p["rc"], round(p.get("images_per_s", 0))) for v, p in probe.items()})
    ok = [v for v in TRIO if probe[v]["rc"] == 0 and probe[v].get("images_per_s")]

    # 3) train: the full recipe, epochs sized to the budget --------------------------------------
    train_end = args.budget - 215  # leaves bench (~100 s), serve (~90 s), packing
    compile_proc = None
    if ok:
        # The steady rate: the probe's whole-epoch figure is mostly start-up (4x too low on an H100).
        slowest = min(probe[v].get("images_per_s_steady", probe[v]["images_per_s"]) for v in ok)
        # per epoch: 60k images at the slowest process's concurrent rate, + 10% for evaluation and
        # epoch boundaries; 30 s fixed for start-up, data preparation, PreciseBN, the last evaluation, saving.
        per_epoch = 60000 / slowest * 1.1
        epochs = int(max(1, min(args.max_epochs, (train_end - now() - 30) // per_epoch)))
        # All three train even if one probe failed: its failure may be the probe's fp16 path alone.
        results["train_plan"] = {"epochs": epochs, "per_epoch_s_est": round(per_epoch, 1), "variants": list(TRIO)}
        say("train plan", results["train_plan"])
        # torch.compile's first compilation costs tens of seconds per shape: do it now, on few CPU
        # threads, so stage 4 finds inductor's caches warm. Its timings are thrown away.
        cenv = {**env, "TORCHINDUCTOR_COMPILE_THREADS": "2", "OMP_NUM_THREADS": "2"}
        compile_proc = start(effnet("bench", "--device", "cuda", "--models", "b0,lite0", "--engines", "torch-compile",
                                    "--batches", "1,8", "--rounds", "1", "--seconds", "0.05", "--quiet"),
                             logs / "bench-warm-up.log", cenv)
        eval_every = max(1, epochs // 5)
        procs = {v: start(effnet("train", "--variant", v, *common, "--epochs", str(epochs), "--ema-decay", "0.999",
                                 "--eval-every", str(eval_every)), logs / f"train-{v}.log", env) for v in TRIO}
        rcs = finish(procs, train_end + 20)
        trained = {}
        for v in TRIO:
            rows = epoch_log(home, f"{'mec-out-e3' if v == 'mec' else v}-fashion-mnist")
            trained[v] = {"rc": rcs[v], "epochs": epochs, "log": rows}
        results["train"] = trained
        results["store"] = [r for r in store_rows(env) if not r.get("tag", "").startswith("probe-")]
        save(out, logs, results)
        say("trained", {v: (t["rc"], t["log"][-1].get("ema_top1") if t["log"] else None) for v, t in trained.items()})
        pack_store(home, out)

    # 4) bench on the GPU ------------------------------------------------------------------------
    if compile_proc is not None:
        finish({"compile-warm-up": compile_proc}, now() + 5)
    bench_end = args.budget - 100
    run(effnet("bench", "--device", "cuda", "--models", "b0,lite0", "--engines", "torch,torch-fp16,onnxruntime",
               "--batches", "1,8,64", "--rounds", "3", "--seconds", "0.4", "--quiet",
               "--record", str(logs / "bench-engines.json")), min(60, bench_end - now() - 40), logs / "bench.log", env)
    run(effnet("bench", "--device", "cuda", "--models", "b0,lite0", "--engines", "torch,torch-compile",
               "--batches", "1,8", "--rounds", "3", "--seconds", "0.4", "--quiet",
               "--record", str(logs / "bench-compile.json")), bench_end - now(), logs / "bench.log", env)
    for name in ("bench-engines", "bench-compile"):
        f = logs / f"{name}.json"
        results[name] = json.loads(f.read_text()) if f.is_file() else None
    save(out, logs, results)

    # 5) serve: b0 on a GPU worker through a real bentoml serve -----------------------------------
    try:
        results["serve"] = serve_check(home, logs, env, deadline=args.budget - 10)
    except Exception as e:  # noqa: BLE001 - recorded, the session still returns its files
        results["serve"] = {"error": f"{type(e).__name__}: {e}"[:3000]}
    save(out, logs, results)
    say("done")
    return 0


def pack_store(home: Path, out: Path) -> None:
    """The trained checkpoints (weights, manifest, log, confusion matrix), gzipped, in 15 MB parts."""
    members = []
    for name in ("b0-fashion-mnist", "mec-out-e3-fashion-mnist", "compact-fashion-mnist"):
        latest = home / "models" / name / "latest"
        if not latest.is_file():
            continue
        folder = home / "models" / name / latest.read_text().strip()
        members += [p for p in folder.iterdir() if p.is_file()] + [latest]
    if not members:
        return
    tgz = Path("/tmp/gpu-checkpoints.tar.gz")
    with tarfile.open(tgz, "w:gz") as tar:
        for p in members:
            tar.add(p, arcname=str(p.relative_to(home)))
    subprocess.run(["split", "-b", "15M", "-d", str(tgz), str(out / "checkpoints.tgz.part")], check=True)
    say("packed", tgz.stat().st_size // 1_000_000, "MB of checkpoints")


def serve_check(home: Path, out: Path, env: dict, deadline: float) -> dict:
    import httpx
    import yaml

    from loadtest.images import fashion_mnist
    from loadtest.processes import ServiceProcess

    tags = {r["tag"].split(":")[0] for r in store_rows(env)}
    b0 = "b0-fashion-mnist" if "b0-fashion-mnist" in tags else "probe-b0"
    compact = "compact-fashion-mnist" if "compact-fashion-mnist" in tags else "probe-compact"
    cfg = {
        "server": {"cpu_threads": 4},
        "default_route": "fashion",
        "variants": {
            "b0": {"model": f"{b0}:latest", "engine": "auto", "gpu": 1, "max_batch_size": 32, "max_latency_ms": 5000},
            # the CPU worker beside it: eager, so the start does not wait for its CPU exports and int8 checks
            "compact": {"model": f"{compact}:latest", "engine": "torch", "max_batch_size": 32, "max_latency_ms": 5000},
        },
        "routes": {"fashion": {"split": {"b0": 0.5, "compact": 0.5}, "shadow": {"variant": "compact", "fraction": 0.2}}},
    }
    cfg_file = Path("/tmp/serve-gpu.yaml")
    cfg_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
    images = fashion_mnist(200, root=env.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
    res: dict = {"config": cfg}
    t = time.monotonic()
    with ServiceProcess(str(cfg_file), home, log_path=out / "serve.log",
                        ready_timeout=max(20, deadline - now() - 40)) as srv:
        res["ready_s"] = round(time.monotonic() - t, 1)
        say("server ready in", res["ready_s"], "s")
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            res["variants"] = c.get("/variants").json()

            def one(img, variant="b0") -> tuple[int, float, bool]:
                t0 = time.perf_counter()
                r = c.post("/classify", files={"image": (img.filename, img.data, img.content_type)},
                           data={"variant": variant})
                dt = time.perf_counter() - t0
                hit = r.status_code == 200 and r.json()["predictions"][0]["index"] in img.labels
                return r.status_code, dt, hit

            for v in ("b0", "compact"):
                seq = [one(img, v) for img in images[:100]]
                lat = sorted(s[1] for s in seq)
                res[f"{v}_sequential"] = {"requests": len(seq), "ok": sum(s[0] == 200 for s in seq),
                                          "top1_hits": sum(s[2] for s in seq), "p50_ms": round(1e3 * lat[len(lat) // 2], 2),
                                          "p95_ms": round(1e3 * lat[int(len(lat) * 0.95)], 2)}
            with ThreadPoolExecutor(16) as pool:
                t0 = time.perf_counter()
                conc = list(pool.map(one, [images[i % len(images)] for i in range(800)]))
                wall = time.perf_counter() - t0
            lat = sorted(s[1] for s in conc)
            res["b0_concurrent16"] = {"requests": len(conc), "ok": sum(s[0] == 200 for s in conc),
                                      "top1_hits": sum(s[2] for s in conc), "req_per_s": round(len(conc) / wall, 1),
                                      "p50_ms": round(1e3 * statistics.median(lat), 2),
                                      "p99_ms": round(1e3 * lat[int(len(lat) * 0.99)], 2)}
            metrics = c.get("/metrics").text
            res["metrics_b0"] = [ln for ln in metrics.splitlines()
                                 if ln.startswith("effnet_") and 'variant="b0"' in ln][:60]
    say("serve", {k: v for k, v in res.items() if k.endswith(("sequential", "concurrent16"))})
    return res


if __name__ == "__main__":
    sys.exit(main())
