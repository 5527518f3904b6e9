"""A soak run: the default service at about half its capacity for a set time, every process sampled.

    with ServiceProcess(...) as svc:                    # `effnet serve` on 127.0.0.1, a private home
        ramp: closed-loop wrk on every route at 1, 4, 16 connections   -> the capacity of the mix
        until the duration is spent, one interval at a time (default 10 s):
            wrk on every route side by side, paced at `share` of the capacity (soak_load)
            halfway through the interval: RSS, open files and threads of every server process
    stop everything (also on Ctrl-C or SIGTERM); fit the growth after the warm-up; write the report

Bounded: 127.0.0.1 only, `max_duration_s` for the soak, each wrk by its own timeout, and the service
and every wrk are stopped whatever happens. The figures and the verdicts are in soak_measure.py, the
report in soak_report.py.
"""
from __future__ import annotations

import json
import shutil
import signal
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from . import soak_load, wrk
from .processes import ServiceProcess
from .run import _signals_as_interrupt
from .soak_measure import (
    RSS_GOAL_MB_PER_H,
    judge,
    sample_tree,
    series_from_samples,
    warmup_seconds,
)

MAX_DURATION_S = 24 * 3600.0


@dataclass
class SoakConfig:
    duration_s: float = 3600.0
    interval_s: float = 10.0  # one load interval and one sample each
    share: float = 0.5  # of the capacity the ramp finds
    connections: int = 4  # per route during the soak
    ramp_levels: tuple[int, ...] = (1, 4, 16)
    ramp_s: float = 5.0  # per level
    warmup_s: float | None = None  # None: the larger of 10% of the duration and 2 minutes (at most half)
    rss_goal_mb_per_h: float = RSS_GOAL_MB_PER_H
    max_error_rate: float = 0.01  # more failed answers than this: the load did not hold
    config: str | None = None
    store_home: str | None = None
    fashion_images: int = 200
    ready_timeout_s: float = 600.0  # a first start prepares the engines
    reports_dir: str = "reports"
    name: str | None = None


def route_images(url: str, fashion_images: int) -> dict[str, list]:
    """{route: images that fit its variants}: Fashion-MNIST PNGs or the photos (loadtest/images.py)."""
    from .images import dataset_for, image_set
    from .service_api import catalog

    variants, routes, _ = catalog(url)
    out = {}
    for route, r in routes.items():
        names = [v for v in (r.get("weights") or {}) if v in variants] or \
                [v for v, d in variants.items() if d["route"] == route]
        if not names:
            continue
        v = variants[names[0]]
        kind = dataset_for(v["dataset"], v["num_classes"], route)
        out[route] = list(image_set(kind, fashion_images))
    return out


def summarise_load(intervals: list[dict]) -> dict:
    """Per route: requests, 2xx, errors by status (and socket errors), mean req/s, p99 of the intervals."""
    out = {}
    for iv in intervals:
        for route, f in iv["routes"].items():
            s = out.setdefault(route, {"requests": 0, "ok": 0, "statuses": {}, "socket_errors": {}, "seconds": 0.0,
                                       "p99_ms": []})
            s["requests"] += f["requests"]
            s["ok"] += f["ok"]
            s["seconds"] += f["seconds"]
            for k, v in f["statuses"].items():
                s["statuses"][k] = s["statuses"].get(k, 0) + v
            for k, v in f["socket_errors"].items():
                s["socket_errors"][k] = s["socket_errors"].get(k, 0) + v
            if f["p99_ms"] is not None:
                s["p99_ms"].append(f["p99_ms"])
    for s in out.values():
        p99 = sorted(s.pop("p99_ms"))
        s["errors"] = s["requests"] - s["ok"] + sum(s["socket_errors"].values())
        s["rps"] = round(s["requests"] / s["seconds"], 2) if s["seconds"] else 0.0
        s["p99_ms_median"] = p99[len(p99) // 2] if p99 else None
        s["p99_ms_max"] = p99[-1] if p99 else None
        s["seconds"] = round(s["seconds"], 1)
    return out


def verdict(processes: list[dict], load: dict, cfg: SoakConfig, server_exit: int | None, end_t: float) -> dict:
    """The run passes when every process passes its goals, none ended early, the server stayed up, and the
    load's errors stayed within `max_error_rate`."""
    reasons = []
    for p in processes:
        if p["pass"] is False:
            failed = [k for k in ("rss", "fds", "threads") if p[k]["pass"] is False]
            reasons.append(f"{p['label']} (pid {p['pid']}): {', '.join(failed)} growth over the goal")
        if p["last_t"] is not None and p["last_t"] < end_t - 1e-6:
            reasons.append(f"{p['label']} (pid {p['pid']}) ended at {p['last_t']:.0f} s, before the run did")
        elif p["pass"] is None:
            reasons.append(f"{p['label']} (pid {p['pid']}): too few samples after the warm-up to judge")
    if server_exit is not None:
        reasons.append(f"the server exited with code {server_exit} during the run")
    requests = sum(s["requests"] for s in load.values())
    errors = sum(s["errors"] for s in load.values())
    rate = errors / max(1, requests)
    if rate > cfg.max_error_rate:
        reasons.append(f"{errors} of {requests} requests failed ({rate:.2%}, over {cfg.max_error_rate:.0%})")
    if not requests:
        reasons.append("no request was answered")
    return {"pass": not reasons, "reasons": reasons, "error_rate": round(rate, 5)}


def execute(cfg: SoakConfig, log=print) -> tuple[Path, dict]:
    """The whole soak; returns (report folder, results). Raises ValueError on a bad configuration."""
    if not 0 < cfg.duration_s <= MAX_DURATION_S:
        raise ValueError(f"the duration is 1 s .. {MAX_DURATION_S / 3600:g} h, got {cfg.duration_s:g} s")
    if shutil.which(wrk.WRK) is None:
        raise FileNotFoundError("wrk is not installed: `apt-get install wrk` (the Makefile's DEBS has it)")
    started_at = datetime.now(UTC)
    name = cfg.name or started_at.strftime("%Y%m%d-%H%M%S")
    out = Path(cfg.reports_dir) / f"soak-{name}"
    out.mkdir(parents=True, exist_ok=True)
    previous = _signals_as_interrupt()
    try:
        return out, _execute(cfg, log, started_at, name, out)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _execute(cfg: SoakConfig, log, started_at: datetime, name: str, out: Path) -> dict:
    from .run import machine
    from .soak_report import write_report

    from store.paths import bentoml_home

    store_home = bentoml_home(cfg.store_home or None)
    warmup_s = cfg.warmup_s if cfg.warmup_s is not None else warmup_seconds(cfg.duration_s)
    results: dict = {"run": name, "date": started_at.isoformat(timespec="seconds"), "config": asdict(cfg),
                     "machine": machine(), "store": str(store_home), "warmup_s": warmup_s, "samples": [],
                     "intervals": [], "notes": []}
    procs: list = []  # running wrk processes, stopped on the way out
    tmp = Path(tempfile.mkdtemp(prefix="effnet-soak-"))
    service = ServiceProcess(cfg.config, store_home, log_path=out / "serve.log", ready_timeout=cfg.ready_timeout_s)
    interrupted = None
    try:
        log(f"starting the service (store {store_home}) ...")
        t = time.monotonic()
        service.start()
        url, root = service.url, service.proc.pid
        results.update(url=url, service_start_s=round(time.monotonic() - t, 1))
        log(f"service ready at {url} in {results['service_start_s']} s")
        loads = soak_load.prepare_routes(route_images(url, cfg.fashion_images), tmp)
        ramp = soak_load.ramp(url, loads, cfg.ramp_levels, cfg.ramp_s, log=log, procs=procs)
        results["ramp"] = {"levels": ramp.levels, "best_connections": ramp.best["connections"]}
        first = ramp.levels[0]["routes"]
        for route, load in loads.items():
            capacity = ramp.best["routes"][route]["ok_rps"]
            load.connections = cfg.connections
            load.target_rps = max(0.1, round(capacity * cfg.share, 2))
            latency = (first[route]["p50_ms"] or 0) / 1000
            load.delay_ms = soak_load.delay_for(load.connections, load.target_rps, latency)
        results["targets"] = {r: {"capacity_rps": ramp.best["routes"][r]["ok_rps"], "target_rps": ld.target_rps,
                                  "connections": ld.connections} for r, ld in loads.items()}
        log("soak: " + ", ".join(f"{r} {ld.target_rps} req/s ({ld.connections} connections)"
                                 for r, ld in loads.items())
            + f" for {cfg.duration_s:.0f} s, a sample every {cfg.interval_s:g} s, warm-up {warmup_s:.0f} s")
        _soak(cfg, url, root, loads, procs, results, service, log)
    except KeyboardInterrupt as e:
        interrupted = str(e) or "Ctrl-C"
        results["notes"].append(f"interrupted ({interrupted}): the figures cover the run until then")
        log(results["notes"][-1])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        service.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    log("stopped the service and the load")
    results["ended"] = datetime.now(UTC).isoformat(timespec="seconds")
    series = series_from_samples(results["samples"])
    end_t = results["samples"][-1]["t"] if results["samples"] else 0.0
    results["soak_s"] = round(end_t, 1)
    if results["samples"] and end_t < 2 * warmup_s:  # an interrupted run: judge what is there
        results["warmup_s"] = warmup_s = min(warmup_s, end_t / 2)
    results["processes"] = judge(series, warmup_s, cfg.rss_goal_mb_per_h)
    results["load"] = summarise_load(results["intervals"])
    results["verdict"] = verdict(results["processes"], results["load"], cfg, results.get("server_exit"), end_t)
    if interrupted:
        results["verdict"]["reasons"].append(f"interrupted after {end_t:.0f} s of {cfg.duration_s:.0f} s")
        results["verdict"]["pass"] = False
    (out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True, default=str))
    write_report(out, results)
    return results


def _soak(cfg: SoakConfig, url: str, root: int, loads: dict, procs: list, results: dict,
          service: ServiceProcess, log) -> None:
    t0 = time.monotonic()
    end = t0 + cfg.duration_s
    results["samples"].append({"t": 0.0, "processes": sample_tree(root)})
    n = 0
    while time.monotonic() < end - 0.5:
        chunk = max(1.0, min(cfg.interval_s, end - time.monotonic()))
        started = time.monotonic()
        running = {route: soak_load.start_wrk(url, load, chunk) for route, load in loads.items()}
        procs.extend(running.values())
        # Halfway through the interval, under load: the connections of this interval are open.
        time.sleep(max(0.0, started + chunk / 2 - time.monotonic()))
        results["samples"].append({"t": round(time.monotonic() - t0, 2), "processes": sample_tree(root)})
        figures = {}
        for route, p in running.items():
            try:
                figures[route] = soak_load.finish_wrk(p, chunk + 60)
            except RuntimeError as e:
                figures[route] = {"seconds": 0.0, "requests": 0, "ok": 0, "rps": 0.0, "ok_rps": 0.0, "statuses": {},
                                  "socket_errors": {"wrk_failed": 1}, "errors": 1, "p50_ms": None, "p99_ms": None,
                                  "max_ms": None}
                results["notes"].append(f"interval {n}: {route}: {e}")
            procs.remove(p)
        results["intervals"].append({"t0": round(started - t0, 2), "t1": round(time.monotonic() - t0, 2),
                                     "routes": figures,
                                     "delay_ms": {r: ld.delay_ms for r, ld in loads.items()}})
        for route, load in loads.items():
            load.delay_ms = soak_load.next_delay_ms(load.connections, load.target_rps, load.delay_ms,
                                                    figures[route]["rps"])
        n += 1
        if n % max(1, int(60 / cfg.interval_s)) == 0:
            latest = results["samples"][-1]["processes"]
            log(f"{time.monotonic() - t0:6.0f} s: " + ", ".join(
                f"{r} {f['rps']:.1f} req/s p99 {f['p99_ms']} ms errors {f['errors']}" for r, f in figures.items())
                + f"; RSS {sum(p['rss_bytes'] for p in latest.values()) / 1e6:.0f} MB in {len(latest)} processes")
        if service.proc is None or service.proc.poll() is not None:
            results["server_exit"] = service.proc.returncode if service.proc else None
            results["notes"].append(f"the server exited at {time.monotonic() - t0:.0f} s")
            log(results["notes"][-1])
            return
