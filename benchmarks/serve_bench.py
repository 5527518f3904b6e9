"""Serving benchmark (not a test): lite0 on the imagenet route and the fashion route, through HTTP.

    .venv/bin/python -m benchmarks.serve_bench                 # the default store ($BENTOML_HOME or ~/bentoml)
    .venv/bin/python -m benchmarks.serve_bench --prepare DIR   # a private store: real Lite0 ImageNet weights,
                                                               # random-weight 32x32 fashion models (same compute)

Run from the repository root. Results and their narrative: benchmarks/serving.md.

1. Offline, before the server starts: lite0 through the same engine the worker uses
   (`engines.load_engine`, same threads), batch-1 median latency and the best images/s over batches;
   then single-thread streams side by side, one per core (what the workers do under load).
2. A real `bentoml serve` with the configuration, then a load generator (wrk where it is installed, the
   Debian package `make setup` adds; else aiohttp in this process): the imagenet route at concurrency 1,
   at saturation, and at concurrency 1 again right after, with real photos (scikit-image's, re-encoded
   as 224x224 JPEGs); the fashion route at saturation with 28x28 PNGs (Fashion-MNIST's when the Debian
   package is installed), split between its variants and then sent to compact alone; each loaded phase
   at `--saturation` clients and then at 32. Saturation throughput is the better of the two levels
   that had no errors. The generator shares the cores with the server: its CPU share is reported.
3. Offline again once the server has stopped: the machine's speed drifts between runs, so the ratio is
   also given against the mean of the two offline figures, and their drift is recorded.
Prints a summary and writes JSON (`--record`).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

from loadtest import wrk
from loadtest.images import fashion_mnist, square_photos
from service.config import cpu_threads, load_config
from store.paths import bentoml_home
from tests.support.serving import FASHION_CLASSES, Server, make_checkpoint


def fashion_images(n: int = 64) -> list[bytes]:
    """Fashion-MNIST test images as PNGs; random 28x28 ones where the dataset is not installed."""
    try:
        return [im.data for im in fashion_mnist(n)]
    except FileNotFoundError:
        import io

        import numpy as np
        from PIL import Image

        out = []
        for a in np.random.default_rng(0).integers(0, 255, (n, 28, 28), dtype=np.uint8):
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, "PNG")
            out.append(buf.getvalue())
        return out


def prepare_store(home: Path) -> None:
    """Real Lite0 weights; fashion variants with random weights (their compute is what is measured)."""
    from store import list_checkpoints

    have = {r["tag"].split(":")[0] for r in list_checkpoints(home)}
    if "lite0-imagenet" not in have:
        from training.pretrained import import_lite0

        print("importing lite0-imagenet:", import_lite0(home=home), file=sys.stderr)
    for name, variant in (("b0-fashion-mnist", "b0"), ("mec-out-e3-fashion-mnist", "mec-out-e3"),
                          ("compact-fashion-mnist", "compact")):
        if name not in have:
            print("random-weight", make_checkpoint(home, name, variant, FASHION_CLASSES, 32, grayscale=True), file=sys.stderr)


def offline(tag: str, threads: int, engine_name: str = "torch", batch_sizes=(1, 8), seconds: float = 4.0) -> dict:
    """The worker's engine alone: batch-1 median latency and images/s per batch size; then, where there
    is more than one thread, `threads` single-thread streams side by side (what the workers' elastic
    threads do under load, service.cpu_slots), so the HTTP figure can be set against both.

    `engine_name` and `batch_sizes` as the worker's configuration has them, so `auto` makes the same
    choice here as in the worker (main() checks that it did)."""
    import threading

    import torch

    from engines import load_engine

    engine, man = load_engine(tag, engine=engine_name, threads=threads, batch_sizes=batch_sizes)
    r = man.resolution
    result = {"engine": engine.describe(), "threads": threads, "batches": {}}
    for batch in (1, 4, 8, 16):
        x = torch.randint(0, 255, (batch, 3, r, r), dtype=torch.uint8)
        for _ in range(3):
            engine(x)
        times, end = [], time.perf_counter() + seconds
        while time.perf_counter() < end or len(times) < 5:
            t0 = time.perf_counter()
            engine(x)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        result["batches"][batch] = {"median_ms": round(med * 1e3, 2), "images_per_s": round(batch / med, 1)}
    result["batch1_median_ms"] = result["batches"][1]["median_ms"]
    result["best_images_per_s"] = max(b["images_per_s"] for b in result["batches"].values())
    if threads > 1:
        # One engine per stream (an OpenVINO infer request is not shared between threads); the runtimes
        # release the GIL, so Python threads run them in parallel.
        # The same engine as above with one thread, as the worker runs its single-thread batches.
        streams = [load_engine(tag, engine=engine.name, threads=1, batch_sizes=batch_sizes)[0] for _ in range(threads)]
        torch.set_num_threads(1)
        result["streams"] = {"streams": threads, "engine": streams[0].describe().get("engine"), "batches": {}}
        for batch in (1, 4, 8):
            x = torch.randint(0, 255, (batch, 3, r, r), dtype=torch.uint8)
            counts = [0] * threads
            end = time.perf_counter() + seconds

            def run(i: int) -> None:
                for _ in range(2):
                    streams[i](x)
                while time.perf_counter() < end:
                    streams[i](x)
                    counts[i] += 1

            t0 = time.perf_counter()
            pool = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
            for t in pool:
                t.start()
            for t in pool:
                t.join()
            result["streams"]["batches"][batch] = {"images_per_s": round(sum(counts) * batch / (time.perf_counter() - t0), 1)}
        result["streams"]["best_images_per_s"] = max(b["images_per_s"] for b in result["streams"]["batches"].values())
        torch.set_num_threads(threads)
    return result


async def load(url: str, images: list[bytes], concurrency: int, seconds: float, fields: dict) -> dict:
    import aiohttp

    latencies, statuses = [], {}
    stop = time.perf_counter() + seconds
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)

    async def client(c: int, session: aiohttp.ClientSession) -> None:
        i = c
        while time.perf_counter() < stop:
            form = aiohttp.FormData()
            form.add_field("image", images[i % len(images)], filename="img", content_type="application/octet-stream")
            for k, v in fields.items():
                form.add_field(k, v)
            t0 = time.perf_counter()
            async with session.post(url + "/classify", data=form, headers={"X-Client-Id": f"bench-{c}"}) as resp:
                await resp.read()
                statuses[resp.status] = statuses.get(resp.status, 0) + 1
                if resp.status == 200:
                    latencies.append(time.perf_counter() - t0)
            i += concurrency

    t_start = time.perf_counter()
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(client(c, session) for c in range(concurrency)))
    wall = time.perf_counter() - t_start
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    gen_cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    lat = sorted(latencies)
    pct = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3, 1)) if lat else (lambda q: None)
    return {"concurrency": concurrency, "seconds": round(wall, 1), "ok": len(lat),
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "req_per_s": round(len(lat) / wall, 1), "p50_ms": pct(0.5), "p90_ms": pct(0.9), "p99_ms": pct(0.99),
            "generator_cpu_share_of_machine": round(gen_cpu / wall / (os.cpu_count() or 1), 3)}


def load_wrk(url: str, images: list[bytes], concurrency: int, seconds: float, fields: dict) -> dict:
    """The same load as `load`, generated by wrk (C, one thread, one connection per client): about a
    tenth of the aiohttp generator's CPU, which otherwise comes out of the two cores being measured.

    On 2 cores the aiohttp generator takes about as much of the machine as the server leaves idle
    (benchmarks/serving.md); wrk is what a user would point at an HTTP endpoint to find its ceiling. The
    Locust load test (loadtest/) stays the behavioural test.
    """
    import subprocess
    import tempfile
    import uuid

    boundary = "effnet" + uuid.uuid4().hex
    with tempfile.TemporaryDirectory(prefix="effnet-wrk-") as tmp:
        for k, img in enumerate(images):
            Path(tmp, f"body-{k}.bin").write_bytes(wrk.multipart_body(img, fields, boundary))
        script = wrk.write_script(Path(tmp, "load.lua"), Path(tmp), len(images), boundary, "bench-", concurrency)
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run([wrk.WRK, "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "120s",
                               "-s", str(script), url], capture_output=True, text=True, timeout=seconds + 180)
        wall = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = wrk.read_result(proc.stdout, proc.stderr, proc.returncode)
    duration = r["duration_us"] / 1e6
    ok = r["statuses"].get("200", 0)
    gen_cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    statuses = dict(sorted(r["statuses"].items()))
    if socket_errors := sum(r[k] for k in wrk.SOCKET_ERRORS):
        statuses["socket_error"] = socket_errors
    # wrk's percentiles cover every answer, not only the 200s; a phase with errors is not a saturation
    # figure anyway (main() takes only levels with 200s alone).
    return {"concurrency": concurrency, "seconds": round(duration, 1), "ok": ok, "statuses": statuses,
            "req_per_s": round(ok / duration, 1), "p50_ms": round(r["p50_us"] / 1e3, 1),
            "p90_ms": round(r["p90_us"] / 1e3, 1), "p99_ms": round(r["p99_us"] / 1e3, 1),
            "max_ms": round(r["max_us"] / 1e3, 1), "generator": "wrk",
            "generator_cpu_share_of_machine": round(gen_cpu / wall / (os.cpu_count() or 1), 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="serving configuration (default service/config.yaml)")
    p.add_argument("--prepare", metavar="DIR", help="use a private BENTOML_HOME at DIR, filled as described above")
    p.add_argument("--seconds", type=float, default=20, help="per load phase (default 20)")
    p.add_argument("--saturation", type=int, default=16, help="concurrent clients at saturation (default 16)")
    p.add_argument("--record", metavar="FILE", help="write the results as JSON")
    p.add_argument("--generator", choices=("auto", "wrk", "aiohttp"), default="auto",
                   help="load generator for the measured phases (auto: wrk if installed, else aiohttp)")
    args = p.parse_args(argv)

    from models.bench import machine_info

    if args.prepare:
        home = Path(args.prepare).resolve()
        os.environ["BENTOML_HOME"] = str(home)
        prepare_store(home)
    home = bentoml_home()
    cfg = load_config(args.config)
    threads = cpu_threads(cfg)
    v = cfg.variants["lite0"]
    generator = args.generator
    if generator == "auto":
        import shutil

        generator = "wrk" if shutil.which("wrk") else "aiohttp"
        if generator == "aiohttp":
            print("wrk is not installed (apt-get install wrk): aiohttp generates the load, and takes about 3% "
                  "of the machine from the server", file=sys.stderr)
    results: dict = {"machine": machine_info(), "store": str(home), "config": cfg.source, "generator": generator}

    print(f"offline: {v.model}, engine {v.engine}, {threads} threads ...", file=sys.stderr)
    results["offline_lite0"] = offline(v.model, threads, v.engine, v.batch_sizes)  # as the worker loads it

    config_path = Path(cfg.source)
    import httpx

    with Server(home, config_path, log=home / "bench-server.log") as server:
        server.wait("/readyz")
        imagenet, fashion = square_photos(), fashion_images()

        async def measure(images: list[bytes], concurrency: int, seconds: float, fields: dict) -> dict:
            if generator == "wrk":
                return await asyncio.to_thread(load_wrk, server.url, images, concurrency, seconds, fields)
            return await load(server.url, images, concurrency, seconds, fields)

        async def run_all() -> None:
            await load(server.url, imagenet, 4, 5, {"route": "imagenet"})  # warm-up
            results["imagenet_c1"] = await measure(imagenet, 1, args.seconds, {"route": "imagenet"})
            results["imagenet_saturation"] = await measure(imagenet, args.saturation, args.seconds, {"route": "imagenet"})
            results["imagenet_c32"] = await measure(imagenet, 32, args.seconds / 2, {"route": "imagenet"})
            # a lone client right after the burst: the batcher must not hold it back by what it learned
            # under load (service.workers.dispatch_without_learned_wait)
            results["imagenet_c1_after_burst"] = await measure(imagenet, 1, args.seconds / 2, {"route": "imagenet"})
            await load(server.url, fashion, 4, 5, {})
            results["fashion_c1"] = await measure(fashion, 1, args.seconds / 2, {})
            results["fashion_saturation"] = await measure(fashion, args.saturation, args.seconds, {})
            results["fashion_c32"] = await measure(fashion, 32, args.seconds / 2, {})
            # the fashion route served by compact alone (explicit choice; its shadow still mirrors)
            compact = {"route": "fashion", "variant": "compact"}
            results["fashion_compact_saturation"] = await measure(fashion, args.saturation, args.seconds, compact)
            results["fashion_compact_c32"] = await measure(fashion, 32, args.seconds / 2, compact)

        asyncio.run(run_all())

        served = {r["variant"]: r for r in httpx.get(server.url + "/variants").json()["variants"]}
        results["served_lite0_engine"] = served["lite0"]["engine"]
        results["same_engine_as_offline"] = served["lite0"]["engine"] == results["offline_lite0"]["engine"]["engine"]
        results["metrics_excerpt"] = [line for line in httpx.get(server.url + "/metrics").text.splitlines()
                                      if line.startswith(("effnet_batch_size_sum", "effnet_batch_size_count",
                                                          "effnet_inference_duration_seconds_sum",
                                                          "effnet_inference_duration_seconds_count"))]

    print("offline again, after the server ...", file=sys.stderr)
    results["offline_lite0_after"] = offline(v.model, threads, v.engine, v.batch_sizes)
    off, after = results["offline_lite0"], results["offline_lite0_after"]
    c1 = results["imagenet_c1"]
    # Saturation throughput: the best of the loaded levels (16 and 32 clients by default) that had no
    # errors, the plateau a load test reads off; the level is recorded beside it.
    levels = [results[k] for k in ("imagenet_saturation", "imagenet_c32")
              if k in results and set(results[k]["statuses"]) == {"200"}]
    sat = max(levels, key=lambda r: r["req_per_s"]) if levels else {"req_per_s": 0.0, "concurrency": None}
    best_any = max(off["best_images_per_s"], off.get("streams", {}).get("best_images_per_s", 0))
    results["ratios"] = {
        "saturation_req_per_s": sat["req_per_s"], "saturation_clients": sat["concurrency"],
        "throughput_vs_offline_best": round(sat["req_per_s"] / off["best_images_per_s"], 3),
        # against the better of one multi-thread stream and single-thread streams side by side
        "throughput_vs_offline_best_any": round(sat["req_per_s"] / best_any, 3),
        # against the mean of the offline best before and after the server ran (the VM's speed drifts)
        "throughput_vs_offline_best_mean": round(
            2 * sat["req_per_s"] / (off["best_images_per_s"] + after["best_images_per_s"]), 3),
        "offline_best_after_over_before": round(after["best_images_per_s"] / off["best_images_per_s"], 3),
        "c1_p50_minus_offline_batch1_ms": round(c1["p50_ms"] - off["batch1_median_ms"], 1) if c1["p50_ms"] else None,
    }
    print(json.dumps(results, indent=2))
    if args.record:
        Path(args.record).parent.mkdir(parents=True, exist_ok=True)
        Path(args.record).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
