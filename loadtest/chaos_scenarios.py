"""The chaos run's named scenarios: what each does to the server, and what it counts as touched.

Each runs inside one window of steady load (chaos.Harness.load) with the /readyz poller on:
before_s of steady load, then the fault (`marks["fault"]`), the fault window until the touched streams
answer 200 again (at most `window_s`) plus `settle_s`, then after_s. Their order matters: `sigterm` ends
the server, and `read-only-store`, the costliest (a whole start), comes last and starts its own.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from . import chaos_faults as faults
from .chaos_report import analyse
from .processes import ROOT


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str
    description: str
    variant: str | None = None  # the touched variant; None: every stream, or no stream for the load-only faults
    clients: dict[str, int] = field(default_factory=dict)  # stream -> clients, over the steady defaults
    replica: int = 0  # which of the variant's worker processes

    def estimate_s(self, cfg) -> float:
        base = cfg.before_s + cfg.after_s + cfg.settle_s + 5
        return base + {"hang": cfg.hang_s + cfg.window_s, "truncate": cfg.rebuild_s, "slow": cfg.slow_hold_s + 10,
                       "burst": 30, "readonly": cfg.ready_timeout_s / 2, "sigterm": cfg.sigterm_wait_s}.get(
            self.kind, cfg.window_s)


SCENARIOS = {s.name: s for s in [
    Scenario("kill-worker", "kill", "kill -9 of b0's only worker process, 24 clients on b0, steady traffic elsewhere",
             "b0", {"b0": 24}),
    Scenario("kill-worker-70", "kill", "the same with 70 clients on b0", "b0", {"b0": 70}),
    Scenario("kill-one-of-two", "kill", "kill -9 of one of lite0's two worker processes", "lite0"),
    Scenario("hang-worker", "hang", "SIGSTOP of b0's worker for hang_s seconds, then SIGCONT", "b0", {"b0": 24}),
    Scenario("slow-headers", "slow", "slow_connections connections that send half a request line and stall for "
             "slow_hold_s seconds, then close"),
    Scenario("max-uploads", "burst", "a burst of `uploads` maximum-size uploads (max_body_mb) at once on the "
             "imagenet route", "lite0"),
    Scenario("truncated-cache", "truncate", "an engine cache file of b0 cut to half its size, then b0's worker "
             "killed: it must rebuild the cache (or fall back to another engine) and serve again", "b0"),
    Scenario("kill-gateway", "gateway", "kill -9 of the gateway process: does BentoML restart it, and how soon"),
    Scenario("sigterm", "sigterm", "SIGTERM of the server's main process under load (what a container runtime "
             "sends): admitted requests finish, /readyz turns 503, the process stops within its grace"),
    Scenario("read-only-store", "readonly", "the server restarted on a read-only copy of the store: it must "
             "become ready and serve every route without writing there"),
]}


def run_one(h, sc: Scenario) -> dict:
    """Runs `sc` against the harness's server; returns its records, marks, fault and analysis."""
    cfg = h.cfg
    if sc.kind != "readonly" and not (h.alive() and h.healthy(30)):
        h.log("  the server is not whole after the previous scenario: starting a fresh one")
        h.stop_server()
        h.start_server(h.served_home)
        if not h.healthy(60):
            raise RuntimeError("a freshly started server did not answer every stream")
    if sc.kind != "readonly":  # a replica still starting after the previous scenario is not "before"
        h.wait_readyz(20)
    if sc.variant and sc.variant not in h.variants:
        raise RuntimeError(f"variant {sc.variant!r} is not served here (served: {', '.join(h.variants)})")
    if sc.kind == "readonly":
        return _read_only(h, sc)
    touched, shared = h.roles(sc.variant if sc.kind in ("kill", "hang", "truncate", "burst") else None)
    if sc.kind == "slow":
        touched, shared = [], []
    # A stream named after the touched variant gets the scenario's clients (b0: 24 or 70).
    clients = h.clients_for(sc.clients)
    entry = {"kind": sc.kind, "variant": sc.variant, "detect_s": cfg.detect_s, "clients": clients,
             "streams": list(h.streams),
             "touched": touched, "shared": shared,
             "counted_down": sc.kind in ("hang", "gateway", "truncate") or (
                 sc.kind == "kill" and len(faults.worker_pids(h.root_pid, sc.variant)) == 1),
             "check_untouched": sc.kind not in ("gateway", "sigterm"),
             "check_refusals": sc.kind in ("kill", "hang", "truncate"), "check_recovery": sc.kind != "sigterm",
             "extra_criteria": {}}
    from .chaos import ReadyzPoller

    if sc.kind == "sigterm":  # /readyz must say 503 at once: half a second for the signal to land
        entry["down"] = (0.5, None)
    with ExitStack() as scope, h.load(clients, sc.name) as load, ReadyzPoller(h.url) as rz:
        h.scope = scope  # what a fault changes and must put back before the next scenario
        marks = {"start": time.time()}
        time.sleep(cfg.before_s)
        marks["fault"] = time.time()
        fault = INJECT[sc.kind](h, sc, marks, load, entry)
        if "during_end" not in marks:
            since = marks.get("cleared", marks["fault"])
            limit = cfg.rebuild_s if sc.kind == "truncate" else cfg.window_s
            back = load.wait_200(touched + shared, since, limit, h.alive) if touched + shared else None
            # A replica still loading (one of two killed) belongs to the fault, not to "after".
            marks["during_end"] = max(back or time.time(), marks.get("replicas_up") or 0.0,
                                      marks["fault"] + 1.0) + cfg.settle_s
            time.sleep(max(0.0, marks["during_end"] - time.time()))
        time.sleep(cfg.after_s if sc.kind != "sigterm" else 1.0)
        marks["end"] = time.time()
    entry.update(fault=fault, marks=marks, records=load.records, readyz=rz.polls)
    entry["analysis"] = analyse(entry)
    _save_raw(h, sc, entry)
    return entry


def _save_raw(h, sc: Scenario, entry: dict) -> None:
    """The raw records go to a file of their own; results.json keeps the figures."""
    raw = h.out / "raw"
    raw.mkdir(exist_ok=True)
    (raw / f"{sc.name}.json").write_text(json.dumps({"records": entry.pop("records"), "readyz": entry.pop("readyz")}))


def _pids(h, sc: Scenario) -> list[int]:
    pids = faults.worker_pids(h.root_pid, sc.variant)
    if not pids:
        raise RuntimeError(f"no worker process of {sc.variant!r} under the server "
                           f"(processes: {faults.service_processes(h.root_pid)})")
    return pids


def _kill(h, sc, marks, load, entry) -> dict:
    pids = _pids(h, sc)
    pid = pids[min(sc.replica, len(pids) - 1)]
    marks["fault"] = time.time()  # at the signal: finding the processes takes a while on a busy machine
    faults.send(pid, signal.SIGKILL)
    info = {"signal": "SIGKILL", "pid": pid, "replicas": len(pids), "restarted_s": _restarted(h, sc, pids)}
    if len(pids) > 1:  # the variant serves on from the others: the fault lasts until the new one is up
        up = marks["replicas_up"] = h.wait_replicas(sc.variant, h.cfg.window_s)
        info["replica_up_s"] = round(up - marks["fault"], 2) if up else None
    return info


def _restarted(h, sc, before: list[int], timeout: float = 10.0) -> float | None:
    """Seconds until a new worker process of the variant exists (BentoML's supervisor restarts it)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if set(faults.worker_pids(h.root_pid, sc.variant)) - set(before):
            return round(time.monotonic() - t0, 2)
        time.sleep(0.1)
    return None


def _hang(h, sc, marks, load, entry) -> dict:
    pid = _pids(h, sc)[0]
    marks["fault"] = time.time()
    faults.send(pid, signal.SIGSTOP)
    try:
        time.sleep(h.cfg.hang_s)
    finally:
        # before the signal: from here the worker may answer again, and a /readyz 200 is no lie
        marks["cleared"] = time.time()
        faults.send(pid, signal.SIGCONT)
    return {"signal": "SIGSTOP, SIGCONT", "pid": pid, "stopped_s": h.cfg.hang_s}


def _gateway(h, sc, marks, load, entry) -> dict:
    pids = faults.gateway_pids(h.root_pid)
    if not pids:
        raise RuntimeError(f"no gateway process under the server ({faults.service_processes(h.root_pid)})")
    marks["fault"] = time.time()
    for pid in pids:
        faults.send(pid, signal.SIGKILL)
    t0, new = time.monotonic(), None
    while time.monotonic() - t0 < h.cfg.window_s and new is None:
        if set(faults.gateway_pids(h.root_pid)) - set(pids):
            new = round(time.monotonic() - t0, 2)
        time.sleep(0.1)
    return {"signal": "SIGKILL", "pids": pids, "gateway_restarted_s": new}


def _truncate(h, sc, marks, load, entry) -> dict:
    model = h.variants[sc.variant].get("model") or ""
    path = faults.engine_cache_file(h.home, model)
    if path is None:
        raise RuntimeError(f"no engine cache file of {model} in the store copy (engines not prepared?)")
    pids = _pids(h, sc)
    # Runs after the file is put back (callbacks unwind in reverse): a worker that could not load it is
    # killed once more, so it loads the whole file and the next scenario needs no fresh server.
    state = {"back": None}
    h.scope.callback(lambda: state["back"] is None and [faults.send(p, signal.SIGKILL) for p in _pids(h, sc)])
    cut = h.scope.enter_context(faults.truncated(path))  # put back when the scenario ends
    marks["fault"] = time.time()
    for pid in pids:
        faults.send(pid, signal.SIGKILL)
    entry["recovery_limit_s"] = h.cfg.rebuild_s
    info = {**cut, "signal": "SIGKILL", "pids": pids, "restarted_s": _restarted(h, sc, pids)}
    back = state["back"] = load.wait_200(entry["touched"] + entry["shared"], marks["fault"], h.cfg.rebuild_s, h.alive)
    # The worker serves on a stand-in engine while it rebuilds the damaged file behind it: the rebuild
    # belongs to the fault, not to "after".
    rebuilt = marks["rebuilt"] = _whole_again(path, marks["fault"] + h.cfg.rebuild_s)
    info["rebuilt_s"] = round(rebuilt - marks["fault"], 2) if rebuilt else None
    marks["during_end"] = max(back or time.time(), rebuilt or 0.0) + h.cfg.settle_s
    time.sleep(max(0.0, marks["during_end"] - time.time()))
    info["size_after"] = path.stat().st_size if path.exists() else None
    entry["extra_criteria"]["serves again after the damaged cache"] = {"pass": back is not None, "value": {
        "file": str(path.relative_to(h.home)), "size": cut["size"], "truncated_to": cut["truncated_to"],
        "size at the end": info["size_after"]}}
    return info


def _whole_again(path: Path, until: float) -> float | None:
    """Epoch time at which `path` matches its recorded size and sha256 again (rebuilt), or None by `until`."""
    from store.durable import intact

    while time.time() < until:
        if intact(path):
            return time.time()
        time.sleep(0.25)
    return None


def _slow(h, sc, marks, load, entry) -> dict:
    spec = {"host": "127.0.0.1", "port": h.service.port, "count": h.cfg.slow_connections, "hold_s": h.cfg.slow_hold_s}
    out = _client_process(h, "slow", spec, h.cfg.slow_hold_s + 60)
    marks["during_end"] = time.time()
    entry["extra_criteria"]["every slow connection opened"] = {"pass": out.get("opened") == out.get("requested"),
                                                              "value": out}
    return out


def _burst(h, sc, marks, load, entry) -> dict:
    from service.config import load_config

    limit = load_config(h.cfg.config).server.max_body_bytes
    body, ctype = _max_upload(Path(h.streams[entry["touched"][0]]["images"][0]).read_bytes() if entry["touched"]
                              else b"", limit, route=next(iter(h.routes)) if not entry["touched"] else
                              h.streams[entry["touched"][0]].get("route"))
    path = h.out / "clients" / "max-upload.bin"
    path.write_bytes(body)
    rss0 = _rss_mib(h)
    sampler = _RssSampler(h)
    with sampler:
        out = _client_process(h, "burst", {"url": h.url, "count": h.cfg.uploads, "body": str(path),
                                           "content_type": ctype, "timeout_s": 60}, 120)
    path.unlink()
    marks["during_end"] = time.time()
    statuses: dict[str, int] = {}
    for r in out.get("requests", []):
        key = str(r["st"]) if r["st"] else r["e"]
        statuses[key] = statuses.get(key, 0) + 1
    bad = {k: n for k, n in statuses.items() if k not in ("200", "413", "429", "503")}
    info = {"uploads": h.cfg.uploads, "bytes_each": len(body), "statuses": statuses,
            "server_pss_mib_before": rss0, "server_pss_mib_peak": sampler.peak}
    entry["extra_criteria"]["every upload answered 200 or a clear refusal, no reset"] = {"pass": not bad, "value": info}
    return info


def _sigterm(h, sc, marks, load, entry) -> dict:
    proc = h.service.proc
    marks["fault"] = time.time()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(h.cfg.sigterm_wait_s)
        stopped = round(time.time() - marks["fault"], 2)
    except subprocess.TimeoutExpired:  # measured: what is left of it is stopped now, not after a second grace
        code, stopped = None, None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    marks["during_end"] = time.time()
    entry["extra_criteria"]["stopped within 30 s"] = {"pass": stopped is not None and stopped <= 30,
                                                      "value": {"stopped_s": stopped, "exit code": code}}
    return {"signal": "SIGTERM", "pid": proc.pid, "stopped_s": stopped, "exit_code": code}


def _read_only(h, sc: Scenario) -> dict:
    """Stop the server, serve a read-only view of the store copy, and check it serves every stream."""
    from .chaos import ReadyzPoller

    h.stop_server()
    try:
        view, how = h.stack.enter_context(faults.read_only_store(h.home))
    except faults.Skipped as e:
        h.start_server(h.home)  # the scenarios after this one still get a server
        return {"skipped": str(e)}
    entry = {"kind": "readonly", "clients": h.clients_for(sc.clients), "streams": list(h.streams), "touched": [],
             "shared": [], "extra_criteria": {}, "fault": {"store": how}}
    try:
        start_s = h.start_server(view)
        ready = None
    except RuntimeError as e:
        entry["extra_criteria"]["ready on a read-only store"] = {"pass": False, "value": str(e)[-600:]}
        h.start_server(h.home)
        entry.update(skipped="the server did not start on the read-only store (see the criterion)")
        return entry
    ready = h.healthy(60)
    entry["extra_criteria"]["ready on a read-only store"] = {"pass": ready, "value": {"start_s": start_s,
                                                                                      "every stream answers": ready}}
    with h.load(entry["clients"], sc.name) as load, ReadyzPoller(h.url) as rz:
        marks = {"start": time.time()}
        time.sleep(h.cfg.before_s + h.cfg.after_s)
        marks["fault"] = marks["during_end"] = marks["end"] = time.time()
    entry.update(marks=marks, records=load.records, readyz=rz.polls)
    entry["analysis"] = analyse(entry)
    _save_raw(h, sc, entry)
    return entry


INJECT = {"kill": _kill, "hang": _hang, "gateway": _gateway, "truncate": _truncate, "slow": _slow, "burst": _burst,
          "sigterm": _sigterm}


# The fault's own clients (the burst of uploads, the stalled connections) run at the lowest priority: on
# a machine whose cores the server shares with them, the CPU they take to send 2.5 GB would otherwise be
# charged to the server's answers to the measured streams. What the server does with them is unchanged.
FAULT_CLIENT_NICE = 19


def _client_process(h, mode: str, spec: dict, timeout: float) -> dict:
    folder = h.out / "clients"
    folder.mkdir(parents=True, exist_ok=True)
    spec_path, out = folder / f"{mode}-spec.json", folder / f"{mode}-result.json"
    spec_path.write_text(json.dumps(spec))
    with open(folder / f"{mode}-clients.log", "wb") as log:
        r = subprocess.run([sys.executable, "-m", "loadtest.chaos_clients", mode, str(spec_path), str(out)], cwd=ROOT,
                           stdout=log, stderr=subprocess.STDOUT, timeout=timeout, start_new_session=True,
                           check=False, preexec_fn=lambda: os.nice(FAULT_CLIENT_NICE))
    if not out.exists():
        raise RuntimeError(f"the {mode} clients failed ({r.returncode}); see {folder / f'{mode}-clients.log'}")
    return json.loads(out.read_text())


def _max_upload(image: bytes, limit: int, route: str | None) -> tuple[bytes, str]:
    """A multipart body of `limit` bytes: the image, padded after its end (decoders stop at the image's end)."""
    boundary = "chaosboundary7d1f"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"route\"\r\n\r\n{route or ''}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    pad = max(0, limit - len(head) - len(tail) - len(image))
    return head + image + b"\0" * pad + tail, f"multipart/form-data; boundary={boundary}"


def _rss_mib(h) -> float:
    """The server's memory: the sum of its processes' PSS (RSS would count the shared batch memory
    and the shared libraries once per process)."""
    import psutil

    total = 0
    for pid in h.service.pids():
        try:
            total += psutil.Process(pid).memory_full_info().pss
        except (psutil.Error, AttributeError):
            pass
    return round(total / 2**20, 1)


class _RssSampler:
    """The server's memory (`_rss_mib`) every 500 ms while a burst runs; its peak."""

    def __init__(self, h) -> None:
        import threading

        self.h, self.peak = h, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.peak = max(self.peak, _rss_mib(self.h))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(2)
