"""The chaos run: the default service under steady load on every route, named faults one after another.

    copy the store; start `effnet serve` on the copy (127.0.0.1, own port and home)
    for scenario in scenarios:              # chaos_scenarios.SCENARIOS, in their order
        load clients (a process of their own, closed loop, Retry-After honoured) + a /readyz poller
        before_s of steady load | the fault, until the touched streams answer 200 again | after_s
        the records -> figures and verdicts (chaos_report.analyse)
    write reports/chaos-<run>/results.json and report.md; stop everything (also on Ctrl-C or SIGTERM)

Every loop is bounded: each window by its seconds, the recovery wait by `window_s`, the whole run by
`max_total_s` (scenarios that no longer fit are skipped and noted). Every address is 127.0.0.1.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from . import chaos_report
from .processes import ROOT, ServiceProcess, stop_process
from .service_api import catalog

READYZ_INTERVAL_S, READYZ_TIMEOUT_S = 0.25, 1.0


@dataclass
class ChaosConfig:
    config: str | None = None  # serving configuration (None: the service's default)
    store_home: str | None = None  # the store to copy (None: $BENTOML_HOME or ~/bentoml)
    scenarios: list[str] | None = None  # None: every scenario, in order
    clients: dict[str, int] = field(default_factory=dict)  # stream -> steady clients (default 2 each)
    explicit: list[str] = field(default_factory=lambda: ["compact", "b0"])  # variants with a stream of their own
    default_clients: int = 2
    max_clients: int | None = None  # a cap on every stream's clients, the scenarios' own counts included
    before_s: float = 5.0
    after_s: float = 5.0
    window_s: float = 20.0  # the longest wait for the touched streams to answer 200 again
    settle_s: float = 2.0  # after the recovery, still in the fault window
    # Seconds a failed variant has to be marked down before its answers and /readyz are judged (the
    # service's goal: 2 s). make test's short run, which judges behaviour and not timing, allows more.
    detect_s: float = 2.0
    hang_s: float = 5.0  # SIGSTOP to SIGCONT
    rebuild_s: float = 30.0  # the longest wait for a worker that rebuilds a damaged cache
    slow_connections: int = 5000
    slow_hold_s: float = 15.0
    uploads: int = 256
    request_timeout_s: float = 30.0
    retry_cap_s: float = 2.0  # the longest Retry-After the clients honour
    sigterm_wait_s: float = 35.0  # how long the stopping server is watched (its drain grace is 25 s)
    max_total_s: float = 570.0
    ready_timeout_s: float = 240.0
    reports_dir: str = "reports"
    name: str | None = None


class Harness:
    """The server under test, its load clients and its /readyz poller, for one run."""

    def __init__(self, cfg: ChaosConfig, out: Path, stack: ExitStack, log) -> None:
        self.cfg, self.out, self.stack, self.log = cfg, out, stack, log
        self.deadline = time.monotonic() + cfg.max_total_s
        self.service: ServiceProcess | None = None
        self.home: Path | None = None  # the private copy of the store the server serves
        self.served_home: Path | None = None  # the copy, or its read-only view
        self.streams: dict[str, dict] = {}
        self.variants: dict = {}
        self.routes: dict = {}
        self.n = 0
        self.scope: ExitStack | None = None  # the running scenario's: what its fault must put back

    # -- the server --------------------------------------------------------------------------------------
    def start_server(self, home: Path | None = None) -> float:
        self.served_home = home or self.home
        self.n += 1
        t = time.monotonic()
        svc = ServiceProcess(self.cfg.config, self.served_home, log_path=self.out / f"serve-{self.n}.log",
                             ready_timeout=self.cfg.ready_timeout_s)
        self.service = self.stack.enter_context(svc)
        return round(time.monotonic() - t, 1)

    def stop_server(self) -> None:
        if self.service is not None:
            self.service.stop()
            self.service = None

    @property
    def url(self) -> str:
        return self.service.url

    @property
    def root_pid(self) -> int:
        return self.service.proc.pid

    def alive(self) -> bool:
        return self.service is not None and self.service.proc is not None and self.service.proc.poll() is None

    def healthy(self, timeout: float) -> bool:
        """Every stream answers 200 within `timeout` (a scenario starts from a whole service)."""
        import httpx

        deadline, pending = time.monotonic() + timeout, set(self.streams)
        while pending and time.monotonic() < deadline and self.alive():
            for name in sorted(pending):
                s = self.streams[name]
                try:
                    r = httpx.post(self.url + "/classify", timeout=5.0, data=_form(s),
                                   files={"image": (s["filename"], Path(s["images"][0]).read_bytes(), s["content_type"])})
                    if r.status_code == 200:
                        pending.discard(name)
                except httpx.HTTPError:
                    pass
            if pending:
                time.sleep(0.5)
        return not pending

    def wait_readyz(self, timeout: float) -> bool:
        """/readyz 200 within `timeout` (bounded: a server whose readiness never turns is measured as it is)."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.alive():
            try:
                if httpx.get(self.url + "/readyz", timeout=2.0).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        return False

    def wait_replicas(self, variant: str, timeout: float) -> float | None:
        """Epoch time at which every replica of `variant` is up again (GET /readyz/VARIANT), or None."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.alive():
            try:
                reps = httpx.get(f"{self.url}/readyz/{variant}", timeout=2.0).json().get("replicas") or []
                if reps and all(r.get("state") == "up" for r in reps):
                    return time.time()
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.25)
        return None

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    # -- what is sent ------------------------------------------------------------------------------------
    def plan_streams(self) -> None:
        """One stream per route (its images by its variants' dataset) and one per explicit variant."""
        self.variants, self.routes, _ = catalog(self.url)
        images = _write_images(self.out / "images")
        for r, info in self.routes.items():
            members = [v for v, w in (info.get("weights") or {}).items() if w]
            fashion = any("fashion" in str(self.variants.get(v, {}).get("dataset") or "") for v in members)
            self.streams[r] = {"name": r, "route": r, "variants": members, **images["fashion" if fashion else "photo"]}
        for v in self.cfg.explicit:
            if v not in self.variants:
                continue
            name = v if v not in self.streams else f"variant-{v}"
            fashion = "fashion" in str(self.variants[v].get("dataset") or "")
            self.streams[name] = {"name": name, "variant": v, "variants": [v],
                                  **images["fashion" if fashion else "photo"]}

    def roles(self, variant: str | None) -> tuple[list[str], list[str]]:
        """(touched, shared): streams served only by `variant`, and streams it shares with others."""
        if variant is None:
            return list(self.streams), []
        touched = [s for s, d in self.streams.items() if d["variants"] == [variant]]
        shared = [s for s, d in self.streams.items() if variant in d["variants"] and s not in touched]
        return touched, shared

    # -- load and readiness ------------------------------------------------------------------------------
    @contextmanager
    def load(self, clients: dict[str, int], tag: str):
        spec = {"url": self.url, "timeout_s": self.cfg.request_timeout_s, "retry_cap_s": self.cfg.retry_cap_s,
                "max_s": self.cfg.max_total_s + 60,
                "streams": [{**s, "clients": clients.get(n, self.cfg.default_clients)} for n, s in self.streams.items()]}
        run = LoadClients(self.out / "clients", tag, spec)
        try:
            yield run.start()
        finally:
            run.stop()

    def clients_for(self, overrides: dict[str, int]) -> dict[str, int]:
        cap = self.cfg.max_clients if self.cfg.max_clients is not None else 10**6
        return {s: min(cap, overrides.get(s, self.cfg.clients.get(s, self.cfg.default_clients))) for s in self.streams}


class LoadClients:
    """`python -m loadtest.chaos_clients load` in its own session; its records as they arrive."""

    def __init__(self, folder: Path, tag: str, spec: dict) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.spec_path, self.out = folder / f"{tag}-spec.json", folder / f"{tag}-records.jsonl"
        self.spec_path.write_text(json.dumps(spec))
        self.log_path = folder / f"{tag}-clients.log"
        self.timeout_s = spec["timeout_s"]
        self.proc: subprocess.Popen | None = None
        self._pos, self.records = 0, []

    def start(self) -> "LoadClients":
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "loadtest.chaos_clients", "load", str(self.spec_path),
                                      str(self.out)], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, start_new_session=True)
        line = self.proc.stdout.readline()  # "started": every client task exists
        if not line:
            raise RuntimeError(f"the load clients did not start; see {self.log_path}")
        return self

    def poll(self) -> list[dict]:
        """The records written since the last call (also kept in `self.records`)."""
        if not self.out.exists():
            return []
        with open(self.out, "rb") as f:
            f.seek(self._pos)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self._pos += end
        new = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
        self.records += new
        return new

    def wait_200(self, streams: list[str], since: float, timeout: float, alive=lambda: True) -> float | None:
        """Epoch time when every one of `streams` has had a 200 for a request sent after `since`."""
        pending = set(streams)
        deadline = time.monotonic() + timeout
        when = since
        while pending and time.monotonic() < deadline:
            for r in self.poll():
                if r["s"] in pending and r["t"] >= since and r["st"] == 200:
                    pending.discard(r["s"])
                    when = max(when, r["t"] + r["dt"])
            if pending:
                time.sleep(0.1)
        self.poll()
        return None if pending else when

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            self.proc.stdin.write(b"stop\n")
            self.proc.stdin.close()
            self.proc.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            stop_process(self.proc, timeout=5)
        self._log.close()
        self.poll()
        self.proc = None


class ReadyzPoller:
    """GET /readyz every 250 ms with a 1 s timeout, on a new connection each time (as a kubelet probes)."""

    def __init__(self, url: str) -> None:
        self.url = url + "/readyz"
        self.polls: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import httpx

        while not self._stop.is_set():
            t0, m0 = time.time(), time.monotonic()
            try:
                st = httpx.get(self.url, timeout=READYZ_TIMEOUT_S).status_code
            except httpx.TimeoutException:
                st = "timeout"
            except httpx.ConnectError:
                st = "refused"
            except httpx.HTTPError as e:
                st = type(e).__name__
            dt = time.monotonic() - m0
            self.polls.append({"t": round(t0, 3), "dt": round(dt, 4), "st": st})
            self._stop.wait(max(0.0, READYZ_INTERVAL_S - dt))

    def __enter__(self) -> "ReadyzPoller":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(READYZ_TIMEOUT_S + 2)


def _form(stream: dict) -> dict:
    return {k: stream[k] for k in ("variant", "route") if stream.get(k)}


def _write_images(folder: Path) -> dict[str, dict]:
    """The photo (scikit-image's coffee as a JPEG) and Fashion-MNIST PNGs, as files for the clients."""
    import io

    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(data.coffee()).save(buf, "JPEG", quality=90)
    (folder / "coffee.jpg").write_bytes(buf.getvalue())
    try:
        from .images import fashion_mnist

        pngs = [im.data for im in fashion_mnist(20)]
    except Exception:  # noqa: BLE001 - no dataset package: grey squares still exercise the route
        pngs = []
        for i in range(4):
            b = io.BytesIO()
            Image.new("L", (28, 28), 40 * i).save(b, "PNG")
            pngs.append(b.getvalue())
    paths = []
    for i, png in enumerate(pngs):
        (folder / f"fashion-{i}.png").write_bytes(png)
        paths.append(str(folder / f"fashion-{i}.png"))
    return {"photo": {"images": [str(folder / "coffee.jpg")], "filename": "coffee.jpg", "content_type": "image/jpeg"},
            "fashion": {"images": paths, "filename": "fashion.png", "content_type": "image/png"}}


def _store_home(cfg: ChaosConfig) -> Path:
    from store.paths import bentoml_home

    return bentoml_home(cfg.store_home or None)


def execute(cfg: ChaosConfig, log=print) -> tuple[Path, dict]:
    """The whole run; returns (report folder, results). Stops everything it started, whatever happens."""
    from .chaos_faults import copy_store
    from .chaos_scenarios import SCENARIOS, run_one
    from .run import _signals_as_interrupt, _versions, machine

    chosen = cfg.scenarios or list(SCENARIOS)
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    started = datetime.now(timezone.utc)
    name = cfg.name or "chaos-" + started.strftime("%Y%m%d-%H%M%S")
    out = Path(cfg.reports_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    store = _store_home(cfg)
    results: dict = {"run": name, "date": started.isoformat(timespec="seconds"), "config": asdict(cfg),
                     "machine": machine(), "versions": _versions(None), "store": str(store), "scenarios": [],
                     "notes": []}
    previous = _signals_as_interrupt()
    try:
        with ExitStack() as stack:
            h = Harness(cfg, out, stack, log)
            h.home = Path(tempfile.mkdtemp(prefix="effnet-chaos-store-"))
            stack.callback(shutil.rmtree, h.home, True)
            log(f"copying the store {store} ...")
            copy_store(store, h.home)
            log("starting the service ...")
            results["service_start_s"] = h.start_server()
            h.plan_streams()
            results["streams"] = {n: {k: s.get(k) for k in ("route", "variant", "variants")} for n, s in h.streams.items()}
            log(f"service ready at {h.url} in {results['service_start_s']} s; streams: {', '.join(h.streams)}")
            for sc_name in chosen:
                sc = SCENARIOS[sc_name]
                entry = {"name": sc_name, "description": sc.description}
                if h.left_s() < sc.estimate_s(cfg):
                    entry["skipped"] = f"max_total_s reached ({h.left_s():.0f} s left, about {sc.estimate_s(cfg):.0f} s needed)"
                else:
                    log(f"[{sc_name}] {sc.description}")
                    try:
                        entry.update(run_one(h, sc))
                    except Exception as e:  # noqa: BLE001 - one scenario's failure is reported, the run goes on
                        entry["skipped"] = f"{type(e).__name__}: {e}"[:2000]
                if "skipped" in entry:
                    entry["analysis"] = {"pass": None, "criteria": {}, "streams": {}}
                    log(f"[{sc_name}] skipped: {entry['skipped'][:300]}")
                else:
                    a = entry["analysis"]
                    log(f"[{sc_name}] {'PASS' if a['pass'] else 'FAIL'}: " + "; ".join(
                        f"{k}: {'pass' if c['pass'] else 'n/a' if c['pass'] is None else 'FAIL'}"
                        for k, c in a["criteria"].items()))
                results["scenarios"].append(entry)
                (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    finally:
        for sig, handler in previous.items():
            import signal

            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        results["ended"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        if results["scenarios"]:
            chaos_report.write(out, results)
    return out, results


def failed(results: dict) -> list[str]:
    return [sc["name"] for sc in results["scenarios"] if sc.get("analysis", {}).get("pass") is False]
