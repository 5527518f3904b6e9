"""One bounded GPU session: what this project can only measure on a lent CUDA machine, in one run.

    python3 benchmarks/gpu/session.py --out DIR --budget 560 [--smoke]

Stages, each with a deadline inside `--budget` seconds, results written to DIR as soon as they exist
(a stage that overruns is killed and the next one still runs):
1. env      GPU, driver, torch, ONNX Runtime providers.
2. train    the full recipe on Fashion-MNIST for b0, mec and compact, and b0 once more without
            RandAugment (`--auto-augment none`): four processes at once. The training set lives on the
            GPU and is augmented there (`--device-data`, on by default with CUDA), and each process
            gets a `--time-budget`, so every schedule ends its cosine inside the stage. GPU utilisation
            is sampled throughout. The better b0, mec and compact are packed into DIR.
3. serve    a real `effnet serve` with the best b0 on a GPU worker (eager `torch`: padded batch sizes,
            warmed at load), compact on the CPU, and Lite0 with its ImageNet weights on the same GPU when
            the store holds it: sequential and concurrent requests, /variants, the workers' metrics.
`--runs` picks the trainings, `--serve-s 0` skips serving, and `--serve-during-training` runs stage 3
on checkpoints copied in with `--store-from` while stage 2 trains (one lease call for both).
The engine benches (torch-compile, fp16) were the first session's (benchmarks/gpu/README.md); they are
not repeated. `--smoke` runs every stage on this CPU with tiny data, to check the script before a lease.
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
import threading
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


def gpu_sampler(stop: threading.Event, rows: list) -> None:
    """nvidia-smi every 5 s: is the GPU or the host the bound?"""
    while not stop.wait(5):
        r = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip():
            util, mem = (int(v) for v in r.stdout.split(",")[:2])
            rows.append({"t": round(now()), "util_pct": util, "mem_mib": mem})


# b0 twice, the variant the 94% target is likeliest for: RandAugment m9 (the recipe) may be too strong for
# 28x28 grayscale at this many epochs, so the same run without it stands beside it.
RUNS = [("b0", "ra"), ("b0", "none"), ("mec", "ra"), ("compact", "ra")]
FINETUNE_FROM = "lite0-imagenet:latest"
# What each run kind adds to the common arguments. NOTE: ft is the CPU machine's best lead to 94%:
# Lite0 fine-tuned from the ImageNet weights reached 90.5% in the quick recipe's 0.75 epoch where it
# reached 86.6% from scratch (benchmarks/training-quick.md); a fine-tune wants a lower peak LR.
AUGMENT_ARGS = {
    "ra": ["--auto-augment", "randaugment"],
    "none": ["--auto-augment", "none"],
    "ft": ["--auto-augment", "none", "--init", FINETUNE_FROM, "--lr", "1e-3", "--warmup-epochs", "0.5"],
}


def run_name(variant: str, aug: str) -> str:
    return f"gpu-{variant}-{aug}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the results")
    ap.add_argument("--budget", type=float, default=560, help="seconds for the whole session")
    ap.add_argument("--batch-size", type=int, default=256, help="per training process")
    ap.add_argument("--max-epochs", type=int, default=40, help="the recipe's; the time budget may cut it")
    ap.add_argument("--serve-s", type=float, default=100, help="seconds kept for the serving stage (0: no serving)")
    ap.add_argument("--runs", default=",".join(f"{v}:{a}" for v, a in RUNS),
                    help="trainings, VARIANT:ra (RandAugment, the recipe), VARIANT:none, or lite0:ft (fine-tune "
                    f"{FINETUNE_FROM}, which --store-from must bring) (default: %(default)s)")
    ap.add_argument("--smoke", action="store_true", help="tiny data on this CPU: checks the script, measures nothing")
    ap.add_argument("--store-from", metavar="DIR", help="copy DIR/models (checkpoints of an earlier session) into the "
                    "store first, e.g. to serve them while this session trains")
    ap.add_argument("--serve-during-training", action="store_true",
                    help="run the serving stage on the stored checkpoints while the trainings run (one lease call "
                    "for both: a lone b0 training left the H200 80%% idle); --serve-s is then not reserved")
    ap.add_argument("--lite0-placements", default="worker",
                    help="serve Lite0 (when stored) once per placement in this list, worker and/or gateway; each is "
                    "its own server start (default: %(default)s)")
    ap.add_argument("--worker-transports", default="shared_memory",
                    help="serve once per server.worker_transport in this list, shared_memory and/or http, for each "
                    "placement (default: %(default)s)")
    args = ap.parse_args()
    runs = [tuple(r.strip().split(":")) for r in args.runs.split(",") if r.strip()]
    bad = [":".join(r) for r in runs if len(r) != 2 or r[1] not in AUGMENT_ARGS]
    if bad:
        ap.error(f"--runs: {bad} are not VARIANT:ra, VARIANT:none or lite0:ft")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="effnet-gpu-logs-"))  # tarred into OUT/logs.tgz after each stage
    home = Path(os.environ.setdefault("BENTOML_HOME", "/tmp/effnet-gpu-home"))
    carried = ROOT / ".gpu" / "fashion-mnist"
    if carried.is_dir():  # the Debian package is not installed on the device machine
        os.environ["FASHION_MNIST_DIR"] = str(carried)
    if args.store_from:
        shutil.copytree(Path(args.store_from) / "models", home / "models", dirs_exist_ok=True)
    env = dict(os.environ)
    results: dict = {"budget_s": args.budget, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     "smoke": args.smoke}

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
                          "--format=csv,noheader"], capture_output=True, text=True) if shutil.which("nvidia-smi") else None
    info["nvidia_smi"] = (smi.stdout.strip() or smi.stderr.strip()) if smi else None
    results["env"] = info
    say("env", info)
    write(out, "results.json", results)
    if not torch.cuda.is_available() and not args.smoke:
        say("no CUDA GPU: nothing to do here")
        return 1

    # 2) train: four processes at once, each with a time budget that ends its schedule in the stage ---
    train_end = args.budget - (0 if args.serve_during_training else args.serve_s) - 15  # serve, then packing
    # ~20 s from process start to the first step (imports, CUDA context, data to the GPU), ~25 s after the
    # last (PreciseBN, evaluation of model and EMA, confusion matrix, saving), 15 s to spare. A run still
    # going at train_end gets 20 s more from the serving stage before it is killed: a lost checkpoint
    # costs more than a shorter serving check.
    budget = max(10, train_end - now() - 60)
    common = ["--data", "fashion-mnist", "--recipe", "full", "--batch-size", str(args.batch_size),
              "--epochs", str(args.max_epochs), "--time-budget", f"{budget:.0f}", "--threads", "2",
              "--ema-decay", "0.9995", "--eval-every", "5", "--no-progress"]
    # NOTE: EMA decay 0.9995 (a ~2,000-step horizon, 8.5 epochs at batch 256), not the recipe's 0.9998: a
    # time-boxed run of ~30-40 epochs (7-9k steps) would otherwise average in weights from mid-schedule.
    if args.smoke:
        common += ["--limit-train", "512", "--limit-val", "256", "--bn-recalibrate", "2", "--resolution", "32",
                   "--epochs", "1", "--device-data", "on"]
    results["train_plan"] = {"time_budget_s": round(budget), "runs": [run_name(*r) for r in runs], "args": common}
    say("train plan", results["train_plan"])
    stop, util = threading.Event(), []
    sampler = threading.Thread(target=gpu_sampler, args=(stop, util), daemon=True)
    if shutil.which("nvidia-smi"):
        sampler.start()
    procs = {run_name(v, aug): start(effnet("train", "--variant", v, *common, *AUGMENT_ARGS[aug],
                                            "--name", run_name(v, aug)),
                                     logs / f"train-{run_name(v, aug)}.log", env) for v, aug in runs}
    stages = [(p.strip(), t.strip()) for p in args.lite0_placements.split(",") if p.strip()
              for t in args.worker_transports.split(",") if t.strip()]
    if args.serve_during_training:
        for i, (placement, transport) in enumerate(stages):
            # the stages share what is left before train_end
            left = (train_end - now()) / (len(stages) - i)
            serve_stage(home, logs, env, results, deadline=now() + left, smoke=args.smoke, lite0_placement=placement,
                        transport=transport)
            save(out, logs, results)
    rcs = finish(procs, train_end + 20)
    stop.set()
    trained = {}
    for v, aug in runs:
        name = run_name(v, aug)
        trained[name] = {"variant": v, "augment": aug, "rc": rcs[name], "log": epoch_log(home, name)}
    results["train"] = trained
    results["gpu_util"] = util
    results["store"] = store_rows(env)
    save(out, logs, results)
    # each name's latest version: a --store-from checkpoint may carry the same name as a run of this session
    latest = {n: (home / "models" / n / "latest").read_text().strip() for n in trained
              if (home / "models" / n / "latest").is_file()}
    top1 = {r["tag"].split(":")[0]: r.get("top1") for r in results["store"] if r["tag"].split(":")[-1] in latest.values()}
    say("trained", {n: (t["rc"], top1.get(n)) for n, t in trained.items()})
    b0 = max((run_name("b0", a) for a in ("ra", "none")), key=lambda n: top1.get(n) or 0)
    names = list(trained) if len(trained) <= 3 else [b0, run_name("mec", "ra"), run_name("compact", "ra")]
    pack_store(home, out, [n for n in names if n in latest])  # 3 checkpoints at most: OUT takes 64 MB

    # 3) serve: the best b0 on a GPU worker through a real bentoml serve ------------------------------
    if args.serve_s and not args.serve_during_training:
        serve_stage(home, logs, env, results, deadline=args.budget - 10, smoke=args.smoke, prefer=b0)
        save(out, logs, results)
    say("done")
    return 0


def serve_stage(home: Path, logs: Path, env: dict, results: dict, deadline: float, smoke: bool,
                prefer: str | None = None, lite0_placement: str = "worker", transport: str = "shared_memory") -> None:
    """results["serve"]: `prefer` (else any stored b0: gpu-b0-*, or the default store's b0-fashion-mnist) on
    the GPU, a stored compact on the CPU if there is one."""
    key = "serve" + ("" if lite0_placement == "worker" else f"_{lite0_placement}") + (
        "" if transport == "shared_memory" else f"_{transport}")
    key = next(k for k in [key] + [f"{key}_{i}" for i in range(2, 10)] if k not in results)  # a repeated stage
    names = {r["tag"].split(":")[0] for r in store_rows(env)}
    b0 = prefer if prefer in names else next((n for n in sorted(names) if n.startswith(("gpu-b0-", "b0-"))), None)
    compact = next((n for n in sorted(names) if "compact" in n), None)
    try:
        if not b0:
            # NOTE: the stall check needs a b0 on the GPU, not a trained one: random weights here, so that
            # the 64 MB carried to the device hold the fine-tune's Lite0 weights instead (top1_hits then
            # mean nothing, and the results say so).
            from tests.support.serving import FASHION_CLASSES, make_checkpoint

            b0 = "b0-random"
            make_checkpoint(home, b0, "b0", FASHION_CLASSES, 40, grayscale=True)
            results["serve_model"] = "b0 with random weights (make_checkpoint): latency only, top-1 hits mean nothing"
        lite0 = "lite0-imagenet" if "lite0-imagenet" in names else None
        results[key] = serve_check(home, logs, env, deadline=deadline, b0=b0, compact=compact, lite0=lite0,
                                   requests=80 if smoke else 800, lite0_placement=lite0_placement, smoke=smoke,
                                   transport=transport)
    except Exception as e:  # noqa: BLE001 - recorded, the session still returns its files
        results[key] = {"error": f"{type(e).__name__}: {e}"[:3000]}


def pack_store(home: Path, out: Path, names: list[str]) -> None:
    """The trained checkpoints (weights, manifest, log, confusion matrix), gzipped, in 15 MB parts."""
    members = []
    for name in names:
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


def photos_224() -> list:
    """The labelled scikit-image photos as 224x224 JPEGs, as `benchmarks/serve_bench.py` sends them: the originals are
    PNGs of up to 640x427 whose decoding in the gateway would be what is measured."""
    import dataclasses
    import io

    from PIL import Image

    from loadtest.images import photos, square_jpeg

    return [dataclasses.replace(p, data=square_jpeg(Image.open(io.BytesIO(p.data))), content_type="image/jpeg",
                                filename=p.filename.rsplit(".", 1)[0] + ".jpg") for p in photos()]


def serve_check(home: Path, out: Path, env: dict, deadline: float, b0: str, compact: str | None,
                lite0: str | None, requests: int, lite0_placement: str = "worker", smoke: bool = False,
                transport: str = "shared_memory") -> dict:
    import httpx
    import yaml

    from loadtest.images import fashion_mnist
    from loadtest.processes import ServiceProcess

    cfg = {
        "server": {"cpu_threads": 4, "worker_transport": transport},
        "default_route": "fashion",
        "variants": {
            # eager on purpose: the first session's GPU worker stalled for seconds on each new batch size;
            # eager engines now pad to powers of two and warm each at load. torch-compile (auto's first
            # choice on a GPU) would spend ~25 s per batch size compiling inside this stage.
            "b0": {"model": f"{b0}:latest", "engine": "torch", "gpu": 1, "max_batch_size": 32, "max_latency_ms": 5000},
        },
        "routes": {"fashion": {"split": {"b0": 1.0}}},
    }
    if compact:  # the CPU worker beside it: eager, so the start does not wait for CPU exports and int8 checks
        cfg["variants"]["compact"] = {"model": f"{compact}:latest", "engine": "torch", "max_batch_size": 32,
                                      "max_latency_ms": 5000}
        cfg["routes"]["fashion"] = {"split": {"b0": 0.5, "compact": 0.5}, "shadow": {"variant": "compact", "fraction": 0.2}}
    if lite0:
        # NOTE: Lite0 with its real ImageNet weights on the same GPU, half each (BentoML's allocator puts two
        # fractions on one device): the imagenet route at 224x224 is where a GPU worker pays off, and the
        # photos' top-1 hits mean something. Two `gpu: 1` workers would ask for two GPUs and fail to start.
        cfg["variants"]["b0"]["gpu"] = 0.5
        cfg["variants"]["lite0"] = {"model": f"{lite0}:latest", "engine": "torch", "gpu": 0.5, "max_batch_size": 32,
                                    "max_latency_ms": 5000, "placement": lite0_placement}
        cfg["routes"]["imagenet"] = {"split": {"lite0": 1.0}}
    cfg_file = Path("/tmp/serve-gpu.yaml")
    cfg_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
    images = fashion_mnist(200, root=env.get("FASHION_MNIST_DIR") or None)
    route_of = {v: r for r, rc in cfg["routes"].items() for v in rc["split"]} | {"compact": "fashion"}
    photo_set = photos_224() if lite0 else ()
    inputs = {v: ([photo_set[i % len(photo_set)] for i in range(200)] if v == "lite0" else images) for v in cfg["variants"]}
    res: dict = {"config": cfg}
    t = time.monotonic()
    with ServiceProcess(str(cfg_file), home, log_path=out / f"serve-{lite0_placement}-{transport}-{int(time.time())}.log",
                        # NOTE: at least 75 s, whatever share of the budget the stage has: a server with two
                        # GPU workers took 40.3 s to be ready on the H200, and a 43 s share lost a stage
                        ready_timeout=max(20 if smoke else 75, deadline - now() - 40)) as srv:
        res["ready_s"] = round(time.monotonic() - t, 1)
        say("server ready in", res["ready_s"], "s")
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            res["variants"] = c.get("/variants").json()

            def one(img, variant="b0") -> tuple[int, float, bool]:
                # a failed request is a row (status 0), not the end of the stage: the first H200 session
                # lost its concurrent figures and metrics to one "connection reset"
                t0 = time.perf_counter()
                try:
                    r = c.post("/classify", files={"image": (img.filename, img.data, img.content_type)},
                               data={"variant": variant, "route": route_of[variant]})
                except httpx.HTTPError:
                    return 0, time.perf_counter() - t0, False
                dt = time.perf_counter() - t0
                hit = r.status_code == 200 and r.json()["predictions"][0]["index"] in img.labels
                return r.status_code, dt, hit

            for v in cfg["variants"]:
                seq = [one(img, v) for img in inputs[v][:100]]
                lat = sorted(s[1] for s in seq)
                res[f"{v}_sequential"] = {"requests": len(seq), "ok": sum(s[0] == 200 for s in seq),
                                          "top1_hits": sum(s[2] for s in seq), "p50_ms": round(1e3 * lat[len(lat) // 2], 2),
                                          "p95_ms": round(1e3 * lat[int(len(lat) * 0.95)], 2),
                                          "max_ms": round(1e3 * lat[-1], 2)}
            for v in ("b0", "lite0"):
                if v not in cfg["variants"]:
                    continue
                n = requests if v == "b0" else requests // 2
                with ThreadPoolExecutor(16) as pool:
                    t0 = time.perf_counter()
                    conc = list(pool.map(lambda img, v=v: one(img, v), [inputs[v][i % len(inputs[v])] for i in range(n)]))
                    wall = time.perf_counter() - t0
                lat = sorted(s[1] for s in conc)
                # max_ms is the stall check: the H100 and H200 sessions saw single requests take 2-7 s
                res[f"{v}_concurrent16"] = {"requests": len(conc), "ok": sum(s[0] == 200 for s in conc),
                                            "top1_hits": sum(s[2] for s in conc), "req_per_s": round(len(conc) / wall, 1),
                                            "p50_ms": round(1e3 * statistics.median(lat), 2),
                                            "p99_ms": round(1e3 * lat[int(len(lat) * 0.99)], 2),
                                            "max_ms": round(1e3 * lat[-1], 2)}
                say(f"{v} concurrent16", res[f"{v}_concurrent16"])
            metrics = c.get("/metrics").text
            # sums and counts: queue wait against inference time tells the batcher's delay from the engine's
            for v in ("b0", "lite0"):
                res[f"metrics_{v}"] = [ln for ln in metrics.splitlines() if ln.startswith("effnet_")
                                       and f'variant="{v}"' in ln and "_bucket" not in ln][:120]
            # the gateway's collections (service/heap.py): whether its ~250 ms pause of session 3 is gone
            res["metrics_gc"] = [ln for ln in metrics.splitlines() if ln.startswith("effnet_gc_")
                                 and "_bucket" not in ln][:120]
    say("serve", {k: v for k, v in res.items() if k.endswith(("sequential", "concurrent16"))})
    return res


if __name__ == "__main__":
    sys.exit(main())
