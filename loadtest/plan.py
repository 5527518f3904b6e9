"""Capacity planning: how many worker replicas of each variant of a route, on which recorded hardware,
carry a request rate within a p99 objective (`effnet plan`).

    runs = load_runs([RESULTS])                       # every recorded run: load tests and GPU serving stages
    plan = make_plan("fashion", 1000, route_loads(cfg, "fashion", 1000), runs, p99_ms=250)
    print(render(plan))

The model is kept simple, so that every number can be checked by hand against the file it came from:
- a variant's load is the route's rate times its split share, plus what the route's shadow mirrors to
  it; a route with a policy may send all of its traffic to any one variant, so each is sized for all of it;
- one replica carries what one measured host carried at its best step whose p99 stayed within the
  objective with at most 1% errors (the rule of the load-test report's "best req/s" column);
- replicas = ceil(load x (1 + the headroom asked for) / that throughput); the headroom left is
  replicas x throughput / load - 1;
- each (profile, variant) uses the newest run of that profile that measured the variant: speeds are
  comparable only within one sitting, so steps of different runs are never mixed.
A step is a measured point; nothing is interpolated or extrapolated. Where no measured step met the
objective the plan says so instead of guessing.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from .analysis import step_row
from .processes import ROOT

# The recorded runs: load-test reports and GPU sessions (benchmarks/RESULTS.md lists them).
RESULTS = ROOT / "benchmarks" / "results"
# A step with more errors than this does not count as meeting the objective (the load test's own default).
MAX_ERROR_RATE = 0.01
# What every plan rests on, printed with it.
NOTES = (
    ("A replica is what one measured host ran: the gateway, one worker of the variant and the load generator "
     "side by side, one variant loaded at a time. The gateway's capacity alone is not recorded; with the "
     "gateway on hosts of its own, each worker host carries more than counted here."),
    ("Runs on one machine differ from hour to hour (benchmarks/loadtest.md): keep headroom for that "
     "(--headroom) and for a replica lost or restarting."),
)


@dataclass(frozen=True)
class Point:
    """One measured step: a closed loop of `users` clients on one variant."""
    users: int
    throughput: float  # req/s answered
    p99_ms: float
    error_rate: float = 0.0


@dataclass(frozen=True)
class Run:
    """One sitting on one machine: a load test, or one serving stage of a GPU session."""
    source: str  # the file, relative to the repository where it is inside it; "#key" names a GPU stage
    what: str  # "load test NAME", "GPU serving stage KEY"
    date: str  # "YYYY-MM-DD HH:MM" (UTC), sortable
    machine: str  # "AMD ..., 2 cores, no GPU"
    profile: str  # short name of the hardware, e.g. "<cpu family>-2c" or the GPU model
    points: dict[str, tuple[Point, ...]]  # variant -> its steps
    order: int = 0  # position within the file: stages of one date in the order they ran
    note: str = ""


@dataclass(frozen=True)
class Load:
    variant: str
    share: float  # of the route's requests
    rps: float
    why: str


@dataclass(frozen=True)
class Sizing:
    """One variant on one profile: the run and step it is sized from, or why it cannot be."""
    variant: str
    load_rps: float
    run: Run | None = None  # None: not measured on this profile
    point: Point | None = None  # None: no measured step met the objective
    replicas: int | None = None
    closest: Point | None = None  # when none met it: the step with the lowest p99, to show how far off

    @property
    def capacity_rps(self) -> float | None:
        return None if self.replicas is None else self.replicas * self.point.throughput

    @property
    def headroom(self) -> float | None:
        if self.replicas is None or self.load_rps <= 0:
            return None
        return self.capacity_rps / self.load_rps - 1


@dataclass(frozen=True)
class ProfilePlan:
    profile: str
    machine: str
    sizings: tuple[Sizing, ...]
    runs_seen: int = 1  # runs of this profile among the figures (the newest per variant is used)

    @property
    def meets(self) -> bool:
        return all(s.replicas is not None for s in self.sizings)

    @property
    def replicas(self) -> int | None:
        return sum(s.replicas for s in self.sizings) if self.meets else None

    @property
    def headroom(self) -> float | None:
        """The tightest variant's: the route as a whole has no more than that."""
        rooms = [s.headroom for s in self.sizings if s.headroom is not None]
        return min(rooms) if self.meets and rooms else None


@dataclass(frozen=True)
class Plan:
    route: str
    rps: float
    p99_ms: float
    loads: tuple[Load, ...]
    profiles: tuple[ProfilePlan, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)
    spare: float = 0.0  # the headroom asked for


# --- figures -------------------------------------------------------------------------------------------

def profile_name(cpu: str | None, cores: int | None, gpu: str | None) -> str:
    """A short name for a machine: the GPU's model, else the CPU's family and its core count."""
    if gpu:
        tokens = [t for t in re.split(r"[\s-]+", gpu) if t and t.lower() not in ("nvidia", "geforce", "tesla")]
        model = next((t for t in tokens if any(c.isdigit() for c in t)), tokens[0] if tokens else "gpu")
        return model.lower()
    words = re.sub(r"\((R|TM)\)", " ", cpu or "").split()
    family = next((w for w in words if w.lower() not in ("amd", "intel", "processor", "cpu", "core", "@")), "cpu")
    return f"{family.lower()}-{cores}c" if cores else family.lower()


def describe_machine(cpu: str | None, cores: int | None, gpu: str | None) -> str:
    return ", ".join([cpu] * bool(cpu) + [f"{cores or '?'} cores", gpu or "no GPU"])


def _date(text: str | None) -> str:
    m = re.search(r"(\d{4}-\d\d-\d\d)[T ](\d\d:\d\d)", text or "")
    return f"{m.group(1)} {m.group(2)}" if m else (text or "")


def _shown(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def run_from_results(path: Path, results: dict | None = None) -> Run | None:
    """A load test's `results.json` (reports/RUN/ of `effnet loadtest`): the per-variant steps, as the
    report reads them (the server's histogram, the client's figures where the server has none)."""
    results = json.loads(path.read_text()) if results is None else results
    m = results.get("machine") or {}
    points: dict[str, list[Point]] = {}
    for step in results.get("steps") or []:
        if step.get("kind") != "variant":
            continue
        r = step_row(step, step["phase"])
        p99 = r["p99_ms"] if r["p99_ms"] is not None else r["locust"]["p99_ms"]
        thr = r["throughput"] if r["throughput"] is not None else r["locust"]["rps"]
        if p99 is not None and thr is not None:
            points.setdefault(step["phase"], []).append(Point(step["users"], thr, p99, r["error_rate"] or 0.0))
    if not points:
        return None
    return Run(_shown(path), f"load test {results.get('run')}", _date(results.get("date")),
               describe_machine(m.get("cpu"), m.get("cores"), m.get("gpu")),
               profile_name(m.get("cpu"), m.get("cores"), m.get("gpu")),
               {v: tuple(p) for v, p in points.items()})


def _number(cell: str) -> float | None:
    try:
        return float(cell.strip().rstrip("%"))
    except ValueError:
        return None


def run_from_report(path: Path) -> Run | None:
    """A load test's `report.md` (as recorded under benchmarks/results/): its "Per step" table."""
    lines = path.read_text().splitlines()
    if not lines or not lines[0].startswith("# Load test "):
        return None
    machine = next((ln for ln in lines if ln.startswith("- **Machine**: ")), "")
    date = next((ln for ln in lines if ln.startswith("- **Date**: ")), "")
    m = re.match(r"- \*\*Machine\*\*: (.+?), (\d+) cores, [^,]* GiB, (?:GPU (.+?)|no GPU) \(", machine)
    cpu, cores, gpu = (m.group(1), int(m.group(2)), m.group(3)) if m else (None, None, None)
    points: dict[str, list[Point]] = {}
    head = None
    for ln in lines[lines.index("## Per step") + 1:] if "## Per step" in lines else []:
        if ln.startswith("## "):
            break
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        if cells[0] == "variant":
            head = {name: i for i, name in enumerate(cells)}
            continue
        if head is None or len(cells) != len(head) or set(cells[0]) <= {"-"}:
            continue
        thr = _number(cells[head["req/s (Prometheus)"]])
        thr = thr if thr is not None else _number(cells[head["req/s (Locust)"]])
        p99 = _number(cells[head["p50/p95/p99 ms (server)"]].split("/")[-1])
        p99 = p99 if p99 is not None else _number(cells[head["p50/p95/p99 ms (client)"]].split("/")[-1])
        errors = _number(cells[head["errors (server)"]])
        if thr is not None and p99 is not None:
            points.setdefault(cells[0], []).append(
                Point(int(cells[head["users"]]), thr, p99, (errors or 0.0) / 100))
    if not points:
        return None
    return Run(_shown(path), f"load test {lines[0][len('# Load test '):].strip()}", _date(date),
               describe_machine(cpu, cores, gpu), profile_name(cpu, cores, gpu),
               {v: tuple(p) for v, p in points.items()})


STAGE_KEY = re.compile(r"(\w+?)_concurrent(\d+)")


def runs_from_gpu_session(path: Path, data: dict | None = None) -> list[Run]:
    """A GPU session's JSON (benchmarks/gpu/session.py): each serving stage (`serve`, `serve_gateway`, ...)
    of each call is a run; its `VARIANT_concurrentN` entries are steps of N clients."""
    data = json.loads(path.read_text()) if data is None else data
    runs: list[Run] = []

    def visit(node, key: str, date: str | None) -> None:
        if not isinstance(node, dict):
            return
        date = node.get("date") if isinstance(node.get("date"), str) else date
        env = node.get("env")
        if isinstance(env, dict) and env.get("gpu"):
            for stage, body in node.items():
                if not (stage.startswith("serve") and isinstance(body, dict)):
                    continue
                points = {}
                for name, fig in body.items():
                    m = STAGE_KEY.fullmatch(name)
                    if m and isinstance(fig, dict) and fig.get("req_per_s") and fig.get("p99_ms") is not None:
                        failed = 1 - fig.get("ok", 0) / fig["requests"] if fig.get("requests") else 0.0
                        points[m.group(1)] = (Point(int(m.group(2)), fig["req_per_s"], fig["p99_ms"], failed),)
                if points:
                    where = f"{key}.{stage}" if key else stage
                    runs.append(Run(f"{_shown(path)}#{where}", f"GPU serving stage {where}", _date(date),
                                    describe_machine(None, env.get("cpu_count"), env["gpu"]),
                                    profile_name(None, env.get("cpu_count"), env["gpu"]), points,
                                    order=len(runs), note=node.get("serve_model") or ""))
            return
        for k, v in node.items():
            visit(v, f"{key}.{k}" if key else k, date)

    visit(data, "", None)
    return runs


def load_runs(sources: list[str | Path]) -> list[Run]:
    """Every run in the given files and folders (folders searched through): load-test `results.json`
    and `report.md`/`loadtest-*.md` files, and GPU session JSON. A report beside its results.json counts once."""
    runs: list[Run] = []
    for source in sources:
        source = Path(source)
        if not source.exists():
            raise FileNotFoundError(f"no figures at {source}")
        files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
        for f in files:
            if f.suffix == ".md" and not (source.is_dir() and (f.parent / "results.json").is_file()):
                run = run_from_report(f)
                runs += [run] if run else []
            elif f.suffix == ".json":
                try:
                    data = json.loads(f.read_text())
                except (ValueError, UnicodeDecodeError):
                    continue
                if isinstance(data, dict) and "steps" in data and "machine" in data:
                    run = run_from_results(f, data)
                    runs += [run] if run else []
                elif isinstance(data, dict):
                    runs += runs_from_gpu_session(f, data)
    return runs


# --- load ----------------------------------------------------------------------------------------------

def _policy_name(policy) -> str:
    return type(policy).__name__.removesuffix("Policy").lower()


def route_loads(cfg, route: str, rps: float) -> list[Load]:
    """The requests per second each variant of `route` must answer at `rps` (`cfg`: service.config's
    ServingConfig). The fallback is not counted: it stands in only while a variant is down."""
    if route not in cfg.routes:
        raise ValueError(f"no route {route!r} in the serving configuration; routes: {', '.join(cfg.routes)}")
    r = cfg.routes[route]
    live = {v: w for v, w in r.split.items() if w > 0}
    if r.policy is not None:
        name = _policy_name(r.policy)
        stages = getattr(r.policy, "stages", None)
        if stages:  # a cascade: every request meets its first stage, the escalated share is not recorded
            return [Load(v, 1.0, rps, "every request starts here (first stage)" if v == stages[0] else
                         f"up to every request ({name} policy: the escalated share is not recorded)")
                    for v in stages]
        return [Load(v, 1.0, rps, f"up to every request ({name} policy: it moves the traffic)")
                for v in r.split]
    loads = {v: Load(v, w, rps * w, f"split {w:.0%}") for v, w in live.items()}
    if r.shadow and r.shadow.fraction > 0:
        # the shadow is sent that fraction of the requests the other variants answer, on top of its own share
        others = sum(w for v, w in live.items() if v != r.shadow.variant)
        extra = r.shadow.fraction * others
        own = loads.get(r.shadow.variant)
        share = (own.share if own else 0.0) + extra
        why = (f"{own.why} + " if own else "") + f"shadow {r.shadow.fraction:.0%} of the {others:.0%} the others answer"
        loads[r.shadow.variant] = Load(r.shadow.variant, share, rps * share, why)
    return list(loads.values())


# --- plan ----------------------------------------------------------------------------------------------

def best_within(points: tuple[Point, ...], p99_ms: float, max_error_rate: float = MAX_ERROR_RATE) -> Point | None:
    """The step that carried the most requests per second with its p99 within `p99_ms` (and at most
    `max_error_rate` errors), or None when no measured step did."""
    fits = [p for p in points if p.p99_ms <= p99_ms and p.error_rate <= max_error_rate]
    return max(fits, key=lambda p: p.throughput, default=None)


def newest_runs(runs: list[Run]) -> dict[tuple[str, str], Run]:
    """(profile, variant) -> the newest run of that profile that measured the variant."""
    out: dict[tuple[str, str], Run] = {}
    for run in sorted(runs, key=lambda r: (r.date, r.order)):
        for variant in run.points:
            out[(run.profile, variant)] = run
    return out


def size(load: Load, run: Run | None, p99_ms: float, spare: float = 0.0,
         max_error_rate: float = MAX_ERROR_RATE) -> Sizing:
    """One variant's replicas on one profile; `spare`: the headroom to keep (0.2: 20% more than the load)."""
    if run is None:
        return Sizing(load.variant, load.rps)
    points = run.points[load.variant]
    best = best_within(points, p99_ms, max_error_rate)
    if best is None:
        return Sizing(load.variant, load.rps, run, closest=min(points, key=lambda p: p.p99_ms))
    # the small epsilon keeps a load that is an exact multiple of the throughput from rounding up
    return Sizing(load.variant, load.rps, run, best,
                  max(0, math.ceil(load.rps * (1 + spare) / best.throughput - 1e-9)))


def make_plan(route: str, rps: float, loads: list[Load], runs: list[Run], p99_ms: float,
              profiles: list[str] | None = None, spare: float = 0.0) -> Plan:
    """Size every variant of the route on every profile of `runs` (or only `profiles`), keeping `spare`
    headroom: profiles that meet the objective first, fewest replicas first."""
    known = sorted({r.profile for r in runs})
    if profiles:
        unknown = [p for p in profiles if p not in known]
        if unknown:
            raise ValueError(f"no figures for profile {', '.join(unknown)}; profiles: {', '.join(known) or 'none'}")
        known = [p for p in known if p in profiles]
    newest = newest_runs(runs)
    plans = []
    for profile in known:
        of_profile = [r for r in runs if r.profile == profile]
        sizings = tuple(size(load, newest.get((profile, load.variant)), p99_ms, spare) for load in loads)
        machine = max(of_profile, key=lambda r: (r.date, r.order)).machine
        plans.append(ProfilePlan(profile, machine, sizings, len(of_profile)))
    plans.sort(key=lambda p: (not p.meets, p.replicas or 0, p.profile))
    return Plan(route, rps, p99_ms, tuple(loads), tuple(plans), NOTES, spare)


# --- output --------------------------------------------------------------------------------------------

def _run_dict(run: Run) -> dict:
    return {"source": run.source, "what": run.what, "date": run.date, "machine": run.machine,
            "profile": run.profile, "note": run.note}


def _point_dict(p: Point | None) -> dict | None:
    return None if p is None else {"users": p.users, "throughput": p.throughput, "p99_ms": p.p99_ms,
                                   "error_rate": p.error_rate}


def to_dict(plan: Plan) -> dict:
    """The plan for machines (`effnet plan --json`)."""
    return {
        "route": plan.route, "rps": plan.rps, "p99_ms": plan.p99_ms, "spare": plan.spare,
        "loads": [{"variant": x.variant, "share": x.share, "rps": x.rps, "why": x.why} for x in plan.loads],
        "profiles": [{
            "profile": p.profile, "machine": p.machine, "meets": p.meets, "replicas": p.replicas,
            "headroom": p.headroom, "runs_seen": p.runs_seen,
            "variants": [{"variant": s.variant, "load_rps": s.load_rps, "replicas": s.replicas,
                          "per_replica": _point_dict(s.point), "capacity_rps": s.capacity_rps,
                          "headroom": s.headroom, "closest": _point_dict(s.closest),
                          "run": _run_dict(s.run) if s.run else None,
                          "status": _status(s, plan.p99_ms)} for s in p.sizings]}
            for p in plan.profiles],
        "gateway": None,
        "notes": list(plan.notes),
    }


def _status(s: Sizing, p99_ms: float) -> str:
    if s.run is None:
        return "not measured"
    if s.point is None:
        return (f"cannot meet: no measured step had p99 <= {p99_ms:g} ms (lowest {s.closest.p99_ms:g} ms at "
                f"{s.closest.throughput:g} req/s, {s.closest.users} users)")
    return "meets"


def _percent(x: float) -> str:
    return f"{x:+.0%}" if abs(x) >= 0.1 else f"{x:+.1%}"


def _rate(x: float) -> str:
    return f"{x:,.1f}" if x < 100 else f"{x:,.0f}"


def render(plan: Plan) -> str:
    """The plan as text: the load per variant, then each hardware profile with its replicas and the run
    each figure came from."""
    L = [f"Route {plan.route} at {plan.rps:,g} req/s with p99 <= {plan.p99_ms:g} ms"
         + (f", keeping {plan.spare:.0%} headroom" if plan.spare else ""), "", "Load per variant:"]
    width = max([len(x.variant) for x in plan.loads] + [len("variant")])
    for x in plan.loads:
        L.append(f"  {x.variant:<{width}} {_rate(x.rps):>8} req/s  {x.why}")
    meets = [f"{p.profile} {p.replicas}" for p in plan.profiles if p.meets]
    L += ["", "Profiles that meet it (replicas in all): " + (", ".join(meets) or "none of those measured")]
    cited: list[Run] = []
    for p in plan.profiles:
        L.append("")
        if p.meets:
            room = p.headroom
            L.append(f"{p.profile} ({p.machine}): meets it with {p.replicas} replica{'s' * (p.replicas != 1)}"
                     + (f", headroom {_percent(room)} (the tightest variant)" if room is not None else ""))
        else:
            missing = [s.variant for s in p.sizings if s.replicas is None]
            L.append(f"{p.profile} ({p.machine}): cannot meet it ({', '.join(missing)}: see below)")
        L.append(f"  {'variant':<{width}}  replicas  {'each: req/s (users, p99)':<26}  capacity  headroom  figures")
        for s in p.sizings:
            if s.run is not None and s.run not in cited:
                cited.append(s.run)
            ref = f"[{cited.index(s.run) + 1}]" if s.run is not None else ""
            if s.replicas is None:
                L.append(f"  {s.variant:<{width}}  {'-':>8}  {_status(s, plan.p99_ms)} {ref}".rstrip())
                continue
            each = f"{_rate(s.point.throughput)} ({s.point.users}, {s.point.p99_ms:.0f} ms)"
            L.append(f"  {s.variant:<{width}}  {s.replicas:>8}  {each:<26}  {_rate(s.capacity_rps):>8}  "
                     f"{_percent(s.headroom):>8}  {ref}")
    L += ["", "Gateway: not recorded on its own (every figure includes it; see the first note).", "", "Figures:"]
    seen = {p.profile: p.runs_seen for p in plan.profiles}
    for i, run in enumerate(cited, 1):
        n = seen[run.profile]
        L.append(f"  [{i}] {run.source}: {run.what}, {run.date} UTC, {run.machine} ("
                 + (f"the newest of {n} {run.profile} runs)" if n > 1 else f"the only {run.profile} run)")
                 + (f"; {run.note}" if run.note else ""))
    if not cited:
        L.append("  none of the route's variants was measured on any profile")
    L += ["", (f"Model: replicas = ceil(load x (1 + headroom asked) / req/s of the best measured step with p99 "
               f"within the target and at most {MAX_ERROR_RATE:.0%} errors), per variant, from the newest run of "
               "each profile; headroom = replicas x that req/s / load - 1.")]
    L += [f"Note: {n}" for n in plan.notes]
    return "\n".join(L)
