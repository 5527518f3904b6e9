"""One load-test run: the service, a Prometheus server, Locust step by step, then the figures.

    with ServiceProcess(...) as svc, PrometheusServer(...) as prom:     # or --url: a running service
        for phase in phases:            # one per variant (explicit), one per split route
            for users in steps:         # default 1, 4, 16, 32 concurrent users, step_s seconds each
                locust --headless ... (a subprocess, its own CSV and tallies; with locust_workers,
                                       a master and N workers: locust_procs.py)
        the experiment phase            # split traffic with feedback until a decision (experiment.py)
        query Prometheus for every step's window
    stop everything (also on Ctrl-C or SIGTERM); write results.json (report.py renders the rest)

Every loop is bounded: steps by their count and `step_s`, each Locust process by a hard timeout,
the whole run by `max_total_s`; every address is 127.0.0.1.
"""
from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from . import experiment as ab
from . import offline, policies, promql
from .images import dataset_for, image_set
from .locust_procs import RunAborted, run_locust_step  # noqa: F401 (RunAborted: what a run raises)
from .processes import ROOT, ServiceProcess
from .prometheus import PrometheusServer, loopback_target
from .service_api import catalog, wait_ready

# The service's own alerting rules: the private Prometheus evaluates them during the run (README, "Alerts").
ALERT_RULES = Path(__file__).resolve().parents[1] / "service" / "prometheus-rules.yml"


@dataclass
class RunConfig:
    url: str | None = None  # a running service; None: start `effnet serve`
    config: str | None = None  # serving config for the started service (None: its default)
    store_home: str | None = None  # BENTOML_HOME holding the models (None: $BENTOML_HOME or ~/bentoml)
    steps: list[int] = field(default_factory=lambda: [1, 4, 16, 32])
    step_s: float = 15.0  # load time per step
    variants: list[str] | None = None  # None: every served variant
    split: bool = True  # also run the split phase of every route with more than one variant
    slo_ms: float = 250.0  # p99 objective for "highest throughput within the SLO"
    max_error_rate: float = 0.01  # a step with more errors does not count as within the SLO
    bad_share: float = 0.02
    fashion_images: int = 10000  # the whole Fashion-MNIST test set: enough distinct images for intervals
    scrape_interval_s: float = 1.0
    settle_s: float = 0.5  # after the last response, before the closing scrape (shadow calls land)
    stop_timeout_s: float = 10.0  # Locust lets in-flight requests finish, so both sides count them
    max_total_s: float = 570.0  # hard bound on the whole run (a first run trains its weak variant on top, ~40 s)
    ready_timeout_s: float = 180.0
    seed: int = 0
    # The experiment phase (experiment.py): split traffic on `experiment_route` with feedback for
    # `feedback_share` of the labelled answers, until the weak variant is decided or `experiment_s` ends.
    experiment: bool = True
    experiment_route: str = "fashion"
    weak_model: str = ab.WEAK_MODEL
    experiment_s: float = 30.0  # the weak variant is decided in 11-13 s at 8 users (benchmarks/loadtest.md)
    experiment_users: int = 8
    feedback_share: float = 1.0
    poll_s: float = 1.0
    reports_dir: str = "reports"
    name: str | None = None
    # The policy phases (policies.py): the budget and cascade routes over `policy_route`'s variants, at the
    # same user counts as the variants. Opt-in: with them, the default steps do not fit in `max_total_s`.
    policies: bool = False
    policy_route: str = "fashion"
    budget_ms: float = 250.0  # X-Latency-Budget-Ms of every budget-route request (the default SLO)
    cascade_data: str | None = None  # `effnet cascade fit --data` (None: the data the stages' manifests name)
    # 0: one Locust process per step; N: a master and N worker processes (Locust distributed), for load
    # that one process (one core, under gevent) cannot generate.
    locust_workers: int = 0


def _store_home(cfg: RunConfig) -> Path:
    from store.paths import bentoml_home

    return bentoml_home(cfg.store_home or None)


def _signals_as_interrupt() -> dict:
    """SIGTERM and SIGINT unwind like Ctrl-C, so every `with` block stops what it started.

    SIGINT too: a process started in the background by a script inherits SIGINT ignored, and Python
    then never raises KeyboardInterrupt. Returns the previous handlers, to restore.
    """
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. under some test runners)
            pass
    return previous


def _versions(prom: PrometheusServer | None) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    # Package metadata, not imports: importing locust would monkey-patch this process with gevent.
    for dist in ("torch", "bentoml", "locust", "prometheus-client", "pillow"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    out["prometheus"] = prom.version() if prom else None
    try:
        out["git"] = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                                    text=True, timeout=10).stdout.strip()
    except Exception:
        out["git"] = None
    return out


def machine() -> dict:
    """The machine of the run (models.bench.machine_info, the one description of a host) and its memory."""
    import psutil

    from models.bench import machine_info

    info = machine_info()
    return {"host": info["host"], "os": platform.platform(), "cpu": info["cpu"], "cores": info["cores"],
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "gpu": info.get("gpu")}


def _cpu_seconds(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def service_pids_on(url: str) -> list[int]:
    """The processes of the server listening at `url` (for --url): the listener, its ancestors up to
    the one that started it, and all their descendants."""
    import psutil
    from urllib.parse import urlsplit

    port = urlsplit(url).port
    try:
        listeners = {c.pid for c in psutil.net_connections("tcp")
                     if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid}
    except (psutil.Error, PermissionError):
        return []
    pids: set[int] = set()
    for pid in listeners:
        try:
            top = psutil.Process(pid)
            while top.parent() is not None and any("bentoml" in part or "effnet" in part
                                                   for part in top.parent().cmdline()):
                top = top.parent()
            pids |= {top.pid} | {c.pid for c in top.children(recursive=True)}
        except psutil.Error:
            continue
    return sorted(pids)


def _machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (all processes, ours and everybody else's)."""
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def plan_phases(cfg: RunConfig, variants: dict, routes: dict) -> list[dict]:
    """Explicit traffic per variant, then split traffic per route that splits between several."""
    # The experiment's weak variant is there to be found worse, not to be load-tested.
    chosen = cfg.variants or sorted((v for v in variants if v != ab.WEAK_VARIANT),
                                    key=lambda v: (variants[v]["route"], v))
    unknown = [v for v in chosen if v not in variants]
    if unknown:
        raise ValueError(f"not served: {', '.join(unknown)}; served: {', '.join(sorted(variants))}")
    phases = [{"kind": "variant", "name": v, "user": "VariantUser", "args": ["--variant", v],
               "route": variants[v]["route"]} for v in chosen]
    for r, info in routes.items():
        if cfg.policies and policies.policy_of(info):
            args = ["--route", r] + (["--budget-ms", f"{cfg.budget_ms:g}"] if policies.policy_of(info) == "budget" else [])
            phases.append({"kind": "policy", "name": r, "user": "PolicyUser", "args": args, "route": r})
    if cfg.split:
        for r, info in routes.items():
            if policies.policy_of(info):  # not a split: the policy chooses per request, nothing is sticky
                continue
            live = [v for v, w in (info.get("weights") or info.get("split") or {}).items() if w]
            if len(live) > 1:
                phases.append({"kind": "split", "name": f"split:{r}", "user": "SplitUser", "args": ["--route", r],
                               "route": r})
    return phases


def offline_top1(variants: dict, store_home: Path, fashion_images: int) -> dict[str, dict]:
    """{variant: {image id: top-1}} from the reference engine, for every variant whose model is in the store."""
    out = {}
    for name, v in variants.items():
        ds = dataset_for(v.get("dataset"), v.get("num_classes"), v.get("route"))
        engine = v.get("engine") if v.get("engine") and v.get("engine") != "auto" else "torch"
        try:
            # every core: the service is idle while this runs
            out[name] = offline.evaluate(v["model"], image_set(ds, fashion_images), home=str(store_home),
                                         engine_name=engine, threads=os.cpu_count() or 1)
        except Exception as e:  # e.g. --url against a service whose store is elsewhere
            out[name] = {"error": str(e)}
    return out


def _measured_step(cfg: RunConfig, url: str, service, prom, phase: dict, users: int, raw: Path,
                   run_s: float | None = None, watch=None) -> dict:
    """One Locust step between two scrapes, with the CPU that the service, Locust and the machine spent."""
    prefix = raw / f"{phase['name'].replace(':', '-')}-u{users}"
    pids = service.pids() if service else service_pids_on(url)
    prom.wait_scraped(10, after=time.time())  # everything before t0 is in a scrape
    t0 = time.time()
    cpu0, busy0 = _cpu_seconds(pids), _machine_busy_s()
    step = run_locust_step(cfg, url, phase["user"], users, prefix, phase["args"], run_s=run_s, watch=watch)
    cpu1, busy1 = _cpu_seconds(pids), _machine_busy_s()
    time.sleep(cfg.settle_s)
    prom.wait_scraped(10, after=time.time())  # ... and everything the step sent is in one
    t1 = time.time()
    wall = step["ended"] - step["started"]
    step.update(phase=phase["name"], kind=phase["kind"], route=phase["route"], users=users, t0=t0, t1=t1,
                # the load time actually run: an experiment that decided early stopped early
                load_s=min(cfg.step_s if run_s is None else run_s, wall),
                cpu={"service_s": round(cpu1 - cpu0, 2), "locust_s": round(step["locust_cpu_s"], 2),
                     "machine_busy_s": round(busy1 - busy0, 2), "service_processes": len(pids),
                     "wall_s": round(wall, 2), "cores": os.cpu_count()})
    return step


def _experiment_phase(cfg: RunConfig, url: str, service, prom, results: dict, raw: Path, deadline: float,
                      log) -> None:
    """Split traffic with feedback on the experiment route until the weak variant is decided (experiment.py)."""
    route = cfg.experiment_route
    info = results.setdefault("experiment", {})
    info.update(route=route, weak=ab.WEAK_VARIANT, users=cfg.experiment_users,
                feedback_share=cfg.feedback_share, max_s=cfg.experiment_s)
    if route not in results["routes"] or ab.read_experiment(url, route) is None:
        results["notes"].append(f"no experiment phase: route {route!r} runs no experiment (give it a `control`)")
        return
    run_s = min(cfg.experiment_s, deadline - time.monotonic() - 2 * cfg.stop_timeout_s - 20)
    if run_s < 5:
        results["notes"].append("no experiment phase: max_total_s reached")
        return
    watch = ab.Watcher(url, route, ab.WEAK_VARIANT)
    log(f"experiment on {route}: {cfg.experiment_users} users, feedback for {cfg.feedback_share:.0%} of labelled "
        f"answers, until {ab.WEAK_VARIANT} is decided (at most {run_s:.0f} s) ...")
    phase = {"kind": "experiment", "name": f"experiment:{route}", "user": "SplitUser", "route": route,
             "args": ["--route", route, "--feedback-share", str(cfg.feedback_share)]}
    step = _measured_step(cfg, url, service, prom, phase, cfg.experiment_users, raw, run_s=run_s, watch=watch)
    results["steps"].append(step)
    watch()  # the last look, after every acknowledged feedback
    info.update(trajectory=watch.trajectory, final=ab.read_experiment(url, route))
    last = watch.trajectory[-1]["variants"] if watch.trajectory else {}
    status = (last.get(ab.WEAK_VARIANT) or {}).get("status")
    log(f"experiment on {route}: {ab.WEAK_VARIANT} {status} after {step['cpu']['wall_s']:.0f} s")


def execute(cfg: RunConfig, log=print) -> Path:
    """Run the whole load test; returns the report folder (results.json written, report rendered)."""
    deadline = time.monotonic() + cfg.max_total_s
    started_at = datetime.now(timezone.utc)
    name = cfg.name or started_at.strftime("%Y%m%d-%H%M%S")
    if cfg.url and "://" not in cfg.url:  # `--url 127.0.0.1:3000`
        cfg = replace(cfg, url=f"http://{cfg.url}")
    if cfg.url:  # before anything is written or started
        loopback_target(cfg.url)
        try:  # a clear refusal instead of urllib's traceback from the first catalog call
            wait_ready(cfg.url.rstrip("/"), timeout=min(10.0, cfg.ready_timeout_s))
        except (TimeoutError, OSError) as e:
            raise ValueError(f"no ready service: {e}; start one (`make serve`), or leave out --url and the load "
                             "test starts its own") from None
    out = Path(cfg.reports_dir) / name
    raw = out / "locust"
    raw.mkdir(parents=True, exist_ok=True)
    previous = _signals_as_interrupt()
    try:
        return _execute(cfg, log, deadline, started_at, name, out, raw)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _execute(cfg: RunConfig, log, deadline: float, started_at: datetime, name: str, out: Path, raw: Path) -> Path:
    from .report import render

    store_home = _store_home(cfg)
    results: dict = {"run": name, "date": started_at.isoformat(timespec="seconds"), "config": asdict(cfg),
                     "machine": machine(), "steps": [], "notes": []}
    with ExitStack() as stack:
        if cfg.url:
            url = cfg.url.rstrip("/")
            service = None
            log(f"target: {url} (already running)")
        else:
            config = cfg.config
            if cfg.experiment:
                trained = ab.ensure_weak_checkpoint(store_home, cfg.weak_model, log)
                results["experiment"] = {"weak_train_s": round(trained, 1)}
                # set-up, as `make checkpoints` is: a first run's training does not cost it its split phase
                deadline += trained
                config = str(ab.write_experiment_config(cfg.config, cfg.experiment_route, cfg.weak_model, out))
            if cfg.policies:
                t = time.monotonic()
                config = str(policies.write_policy_config(config, cfg.policy_route, cfg.budget_ms, out,
                                                          leave_out=(ab.WEAK_VARIANT,)))
                results["cascade"] = {"fit": policies.fit_thresholds(Path(config), store_home, cfg.cascade_data, log)}
                deadline += time.monotonic() - t  # set-up, as the weak variant's training is
            log(f"starting the service (store {store_home}) ...")
            t = time.monotonic()
            service = stack.enter_context(ServiceProcess(config, store_home, log_path=out / "serve.log",
                                                         ready_timeout=cfg.ready_timeout_s))
            url = service.url
            results["service_start_s"] = round(time.monotonic() - t, 1)
            log(f"service ready at {url} in {results['service_start_s']} s")
        variants, routes, default_route = catalog(url)
        results.update(variants=variants, routes=routes, default_route=default_route, url=url)
        log("served: " + ", ".join(f"{v} ({d['route']})" for v, d in variants.items()))
        phases = plan_phases(cfg, variants, routes)

        log("offline evaluation of the images to be sent ...")
        results["offline_top1"] = offline_top1({v: variants[v] for v in variants}, store_home, cfg.fashion_images)
        cascade = routes.get(policies.CASCADE_ROUTE)
        if cfg.policies and cascade and policies.policy_of(cascade) == "cascade":
            stages = cascade["policy"]["cascade"]["stages"]
            try:
                ds = dataset_for(variants[stages[0]].get("dataset"), variants[stages[0]].get("num_classes"),
                                 variants[stages[0]].get("route"))
                results.setdefault("cascade", {})["curve"] = policies.offline_curve(
                    stages, variants, image_set(ds, cfg.fashion_images), store_home)
            except Exception as e:  # e.g. --url against a service whose store is elsewhere
                results.setdefault("cascade", {})["curve"] = {"error": str(e)}
        elif cfg.policies:
            results["notes"].append(f"no cascade phase: the service serves no route {policies.CASCADE_ROUTE!r}")

        prom = stack.enter_context(PrometheusServer({"effnet": url}, interval_s=cfg.scrape_interval_s,
                                                    keep_dir=out, rule_files=[ALERT_RULES]))
        results["prometheus"] = {"url": prom.url, "scrape_interval_s": cfg.scrape_interval_s}
        results["versions"] = _versions(prom)
        log(f"prometheus at {prom.url}, scraping {url} every {cfg.scrape_interval_s} s")

        n_steps = len(phases) * len(cfg.steps)
        # The experiment phase keeps its time: ordinary steps stop short of it.
        reserve = cfg.experiment_s + 2 * cfg.stop_timeout_s + 30 if cfg.experiment else 0.0
        i = 0
        for phase in phases:
            for users in cfg.steps:
                i += 1
                left = deadline - time.monotonic() - reserve
                if left < cfg.step_s + cfg.stop_timeout_s + 15:
                    results["notes"].append(f"stopped before {phase['name']} x{users}: max_total_s reached")
                    log(results["notes"][-1])
                    break
                step = _measured_step(cfg, url, service, prom, phase, users, raw)
                results["steps"].append(step)
                agg = step["stats"].get("Aggregated", {})
                log(f"[{i}/{n_steps}] {phase['name']:<16} {users:>3} users: {agg.get('count', 0):>6} requests, "
                    f"{agg.get('failures', 0)} failures, {agg.get('rps') or 0:.1f} req/s, p95 {agg.get('p95_ms')} ms")
            else:
                continue
            break
        if cfg.experiment:
            _experiment_phase(cfg, url, service, prom, results, raw, deadline, log)

        log("querying prometheus ...")
        if results["steps"]:  # what the service's alerting rules made of the run
            results["alerts"] = prom.alerts_during(results["steps"][0]["t0"], results["steps"][-1]["t1"])
        names = promql.MetricNames.discover(prom)
        if not any(r.get("shadow") for r in routes.values()):  # nothing was mirrored: no series to find
            names.notes = [n for n in names.notes if "shadow" not in n]
        results["metric_names"] = names.to_dict()
        for step in results["steps"]:
            w = promql.Window(step["t0"], step["t1"], step["load_s"])
            step["prometheus"] = {"all": promql.step_metrics(prom, names, w, None)}
            for v in variants:
                if step["kind"] == "variant" and step["phase"] != v:
                    continue
                if step["kind"] in ("split", "policy") and variants[v]["route"] != step["route"] and v not in (
                        routes.get(step["route"], {}).get("weights") or {}):
                    continue
                step["prometheus"][v] = promql.step_metrics(prom, names, w, v)
            if step["kind"] in ("split", "experiment"):
                step["prometheus"]["split"] = promql.split_metrics(prom, names, w, step["route"])
    log("stopped prometheus" + ("" if cfg.url else " and the service"))
    results["ended"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    from .analysis import summarise

    results["summary"] = summarise(results, cfg)
    (out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True, default=str))
    render(out)
    return out
