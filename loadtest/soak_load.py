"""The soak's load: wrk on each route, first closed-loop to find the capacity, then paced at a share of it.

wrk (C, a tenth of the CPU of a Python client) sends prepared multipart bodies; its Lua side counts
answers by status and prints one JSON line at the end. A soak is a series of wrk runs of one interval
each, one wrk per route side by side, so every interval has its own req/s, statuses and p99 per route.

Pacing: the Debian wrk has no fixed-rate mode (that is wrk2), but its Lua `delay()` holds each connection
for a while before its next request. With C connections, a delay d and a latency L, a route carries
C / (d + L) req/s; after each interval the delay is set again from what the interval carried, so the
rate follows the target while the latency changes (`next_delay_ms`). Latency is measured from the write
of each request, so the pause does not count in it.
"""
from __future__ import annotations

import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from . import wrk


@dataclass
class RouteLoad:
    """One route's bodies on disk (written once) and how wrk sends them."""
    route: str
    folder: Path
    n: int
    boundary: str
    connections: int = 4
    delay_ms: int = 0  # 0: closed loop
    target_rps: float | None = None

    def script(self) -> Path:
        path = self.folder / f"load-{self.delay_ms}.lua"
        if not path.exists():
            wrk.write_script(path, self.folder, self.n, self.boundary, f"soak-{self.route}-", 64, self.delay_ms)
        return path


def prepare_routes(images: dict[str, list], root: Path) -> dict[str, RouteLoad]:
    """{route: [LabelledImage]} -> a RouteLoad per route, its bodies written under `root`."""
    out = {}
    for route, imgs in images.items():
        folder = Path(tempfile.mkdtemp(prefix=f"wrk-{route}-", dir=root))
        boundary = "effnet" + uuid.uuid4().hex
        for k, img in enumerate(imgs):
            (folder / f"body-{k}.bin").write_bytes(
                wrk.multipart_body(img.data, {"route": route}, boundary, img.filename, img.content_type))
        out[route] = RouteLoad(route, folder, len(imgs), boundary)
    return out


def start_wrk(url: str, load: RouteLoad, seconds: float, connections: int | None = None) -> subprocess.Popen:
    """wrk on one route for `seconds` (its own session: stopping it reaches nothing else)."""
    c = connections or load.connections
    return subprocess.Popen([wrk.WRK, "-t1", f"-c{c}", f"-d{max(1, round(seconds))}s", "--timeout", "30s",
                             "-s", str(load.script()), url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def parse_wrk(stdout: str, stderr: str = "", returncode: int = 0) -> dict:
    """wrk's EFFNET_WRK line -> {seconds, requests, ok, rps, statuses, p50_ms, p99_ms, max_ms, socket_errors}."""
    r = wrk.read_result(stdout, stderr, returncode)
    seconds = max(r["duration_us"] / 1e6, 1e-6)
    statuses = {str(k): v for k, v in sorted(r["statuses"].items())}
    socket_errors = {k: r[k] for k in wrk.SOCKET_ERRORS if r.get(k)}
    answered = sum(statuses.values())
    ok = sum(v for k, v in statuses.items() if k.startswith("2"))
    return {"seconds": round(seconds, 2), "requests": answered, "ok": ok, "rps": round(answered / seconds, 2),
            "ok_rps": round(ok / seconds, 2), "statuses": statuses, "socket_errors": socket_errors,
            "errors": answered - ok + sum(socket_errors.values()),
            "p50_ms": round(r["p50_us"] / 1e3, 2) if answered else None,
            "p99_ms": round(r["p99_us"] / 1e3, 2) if answered else None,
            "max_ms": round(r["max_us"] / 1e3, 2) if answered else None}


def finish_wrk(proc: subprocess.Popen, timeout: float) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return parse_wrk(out, err, proc.returncode)


def run_side_by_side(url: str, loads: dict[str, RouteLoad], seconds: float, connections: int | None = None,
                     procs: list | None = None) -> dict[str, dict]:
    """One wrk per route for `seconds`, side by side; {route: parse_wrk figures}. `procs` (a list) holds the
    running wrk processes, so that an interrupt can stop them."""
    procs = procs if procs is not None else []
    running = {route: start_wrk(url, load, seconds, connections) for route, load in loads.items()}
    procs.extend(running.values())
    try:
        return {route: finish_wrk(p, seconds + 60) for route, p in running.items()}
    finally:
        for p in running.values():
            if p.poll() is None:
                p.kill()
                p.wait()
            if p in procs:
                procs.remove(p)


@dataclass
class Ramp:
    levels: list[dict] = field(default_factory=list)  # {connections, routes: {route: figures}, ok_rps}
    best: dict | None = None


def ramp(url: str, loads: dict[str, RouteLoad], levels=(1, 4, 16), seconds: float = 5.0, log=print,
         procs: list | None = None) -> Ramp:
    """Closed-loop wrk on every route at once, at each connection count; the best level is the one with the
    most successful answers per second in all, and its per-route rates are the capacity of this mix."""
    out = Ramp()
    for c in levels:
        figures = run_side_by_side(url, loads, seconds, connections=c, procs=procs)
        total = sum(f["ok_rps"] for f in figures.values())
        errors = sum(f["errors"] for f in figures.values())
        row = {"connections": c, "routes": figures, "ok_rps": round(total, 1), "errors": errors}
        out.levels.append(row)
        log(f"ramp: {c} connection(s) per route: {total:.1f} req/s answered 2xx, {errors} errors " + ", ".join(
            f"{r} {f['ok_rps']:.1f} req/s p99 {f['p99_ms']} ms" for r, f in figures.items()))
        if out.best is None or total > out.best["ok_rps"]:
            out.best = row
    return out


def delay_for(connections: int, target_rps: float, latency_s: float) -> int:
    """The pause (ms) that makes `connections` connections with this latency carry `target_rps`."""
    if target_rps <= 0:
        return 60_000
    return int(max(0.0, connections / target_rps - latency_s) * 1000)


def next_delay_ms(connections: int, target_rps: float, delay_ms: int, carried_rps: float) -> int:
    """Pacing feedback: an interval with pause d that carried r req/s had a cycle of C / r per request,
    so its latency was C / r - d; the next pause is the one that carries the target with that latency.
    Bounded so one odd interval cannot swing the load far."""
    if carried_rps <= 0:
        return max(0, delay_ms // 2)
    latency_s = max(0.0, connections / carried_rps - delay_ms / 1000)
    new = delay_for(connections, target_rps, latency_s)
    return int(min(max(new, delay_ms * 0.5), delay_ms * 2 + 10))
