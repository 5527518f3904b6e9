"""The serving configuration: which checkpoints are served, on what, with which batching, in which routes.

The YAML file (default `service/config.yaml`; `effnet serve --config` or `$EFFNET_SERVE_CONFIG`
overrides it) is validated here into frozen dataclasses, so a typo fails at start-up with the key
named instead of surfacing as a 500 under load. Validation that needs the checkpoints (a variant whose
classes differ from its route's) is `check_label_spaces`, run by `effnet serve` before starting and by
the gateway at start-up.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .config_checks import ConfigError, check_keys as _keys, check_number as _number
from .server_config import ServerConfig, parse_server, tracing_options  # noqa: F401 (imported from here)

log = logging.getLogger(__name__)

CONFIG_ENV = "EFFNET_SERVE_CONFIG"
DEFAULT_CONFIG = Path(__file__).with_name("config.yaml")


PLACEMENTS = ("worker", "gateway")  # VariantConfig.placement
CALL_DEADLINE_MARGIN_S = 1.0  # VariantConfig.call_deadline_s: transport on top of the latency budget
EXACT_BATCH_SIZES = 8  # a variant batching at most this many compiles every size (see VariantConfig.batch_sizes)


@dataclass(frozen=True)
class VariantConfig:
    name: str  # the name clients use (`variant=` field), e.g. "b0"
    model: str  # store tag, e.g. "b0-fashion-mnist:latest"
    # engines.load_engine name; auto keeps the fastest engine verified against eager PyTorch, and
    # `make engines` exports and verifies them ahead of time, so a start does not wait for exports
    engine: str = "auto"
    gpu: float = 0  # GPUs to request (a fraction shares one); 0 = CPU. Used only when CUDA is present.
    threads: int = 0  # most intra-op threads a CPU batch uses; 0 = the server's cpu_threads
    # Processes serving this variant, each with its own batcher. On the CPU they share the server's
    # core slots (service.cpu_slots): with 2, two single-thread batches run side by side when busy.
    workers: int = 1
    # 32x32 models: compute is tiny and each call costs the same HTTP work, so large batches are cheap
    max_batch_size: int = 32
    # The load-shedding budget: a request whose estimated wait (queue + batch) passes it is answered
    # 503 + Retry-After; 5 s serves 32 concurrent clients on 2 busy cores (benchmarks/serving.md).
    max_latency_ms: int = 5000
    # Gateway -> worker calls in flight; requests beyond them wait in the gateway and go together as
    # one call (service.coalesce). 0 = two per worker process: one running, one queued behind it.
    calls_in_flight: int = 0
    # Where inference runs: "worker" (its own BentoML service processes, behind an HTTP hop) or
    # "gateway" (`workers` streams inside the gateway process: no hop, no isolation; service/inprocess.py).
    placement: str = "worker"
    # Requests admitted to this variant at once, from routing to the answer (service/admission.py); more
    # borrow from the server's burst pool, then get 429. 0 = what its calls carry in one round:
    # calls_in_flight x max_batch_size (the coalescer sheds by time what that round cannot answer).
    max_inflight: int = 0
    # Where its workers are when the gateway does not start them: URLs, or one dns://NAME:PORT whose every
    # address is a replica, resolved again every resolve_every_s (service/worker_addresses.py).
    workers_at: tuple[str, ...] = ()
    resolve_every_s: float = 10.0

    @property
    def resolved_max_inflight(self) -> int:
        """`max_inflight`, with 0 resolved to its default."""
        return self.max_inflight or self.resolved_calls_in_flight * self.max_batch_size

    @property
    def call_deadline_s(self) -> float:
        """How long one gateway -> worker call may take: the variant's whole latency budget plus a second
        of transport; a call past it means a hung or dead worker, not a slow one, since the worker's
        batcher refuses (503) what it cannot start within max_latency_ms."""
        return self.max_latency_ms / 1000 + CALL_DEADLINE_MARGIN_S

    @property
    def resolved_calls_in_flight(self) -> int:
        """`calls_in_flight`, with 0 resolved to its default."""
        if self.calls_in_flight:
            return self.calls_in_flight
        # In the gateway a call beyond the streams would only wait for one; left queued, it joins the next batch.
        if self.placement == "gateway":
            return self.workers
        return 2 * self.replicas_expected

    @property
    def replicas_expected(self) -> int:
        """Its worker processes: `workers`, or one per listed URL; a dns:// name's count is known only once it
        resolves (the dispatcher then sets its calls in flight, service/remote_workers.py)."""
        if self.workers_at and not self.workers_at[0].startswith("dns://"):
            return len(self.workers_at)
        return self.workers

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """The batch sizes this worker's static-shape engines compile, and pad a batch up to: the powers
        of two up to max_batch_size and max_batch_size itself; every size when max_batch_size is at most
        `EXACT_BATCH_SIZES` (the large-input variants, such as lite0 at 224x224).

        Padding costs a large-input variant per real image (a batch of 3 run as 4 costs a third more),
        while every size for the 32x32 models would make a restart pass 60 s, since each size compiles
        twice per process; their route is bound by the gateway, not by padding (benchmarks/engines.md).
        """
        if self.max_batch_size <= EXACT_BATCH_SIZES:
            return tuple(range(1, self.max_batch_size + 1))
        sizes, b = {self.max_batch_size}, 1
        while b < self.max_batch_size:
            sizes.add(b)
            b *= 2
        return tuple(sorted(sizes))


@dataclass(frozen=True)
class ShadowConfig:
    variant: str
    fraction: float  # of the route's requests mirrored to the shadow


@dataclass(frozen=True)
class RouteConfig:
    name: str
    split: dict[str, float]  # variant -> weight, normalised to sum 1
    shadow: ShadowConfig | None = None
    # The variant that answers a down variant's share of the route until it recovers (service/health.py)
    fallback: str | None = None
    # The variant the others are compared with: a route with a control runs an experiment, its answers
    # are recorded and take feedback (POST /feedback, GET /experiments; service/experiments/)
    control: str | None = None
    policy: Any = None  # service/experiments/policy.py (BanditPolicy, ...), service/cascade.py; None: the split as set

    @property
    def variants(self) -> list[str]:
        """Every variant that may answer in this route: the split's, then the shadow, then the fallback."""
        names = list(self.split)
        for extra in (self.shadow.variant if self.shadow else None, self.fallback):
            if extra and extra not in names:
                names.append(extra)
        return names


@dataclass(frozen=True)
class ServingConfig:
    variants: dict[str, VariantConfig]
    routes: dict[str, RouteConfig]
    default_route: str
    server: ServerConfig = field(default_factory=ServerConfig)
    source: str = ""  # the file it came from, for messages

    def routes_of(self, variant: str) -> list[str]:
        return [r for r, route in self.routes.items() if variant in route.variants]

    def route_of(self, variant: str) -> str:
        """The route a variant answers in when the client names only the variant (default route first)."""
        routes = self.routes_of(variant)
        return self.default_route if self.default_route in routes else routes[0]


def cpu_threads(cfg: ServingConfig) -> int:
    from engines.threads import available_cores

    return cfg.server.cpu_threads or available_cores()


def variant_threads(v: VariantConfig, cfg: ServingConfig) -> int:
    """A worker's inference threads: its own setting, else the server's budget. `effnet serve --prepare`
    uses it too, so that auto's recorded choice carries the worker's key."""
    return v.threads or cpu_threads(cfg)


def variant_thread_counts(v: VariantConfig, cfg: ServingConfig, device: str) -> list[int]:
    """The thread counts a worker's batches may run with, one engine each, the full count first (where the
    engine is chosen). On the CPU a batch gets the variant's threads when every core slot is free and one
    when the machine is busy (service.cpu_slots)."""
    threads = variant_threads(v, cfg)
    return sorted({1, threads}, reverse=True) if device == "cpu" else [threads]


def variant_device(v: VariantConfig, cuda_available: bool) -> str:
    """Where a worker runs: CUDA when the variant asks for GPUs and CUDA is present, else the CPU."""
    return "cuda" if v.gpu > 0 and cuda_available else "cpu"


def config_path(path: str | os.PathLike | None = None) -> Path:
    return Path(path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


def parse_route(name: str, r: Any, variants: dict[str, Any], where: str | None = None) -> RouteConfig:
    """One route's settings ({"split": ..., "shadow": ...}) -> RouteConfig; raises ConfigError naming the key.
    Used for the configuration file and for live changes (PATCH /routes/NAME)."""
    where = where or f"routes.{name}"
    r = _keys(where, r, {"split", "shadow", "fallback", "control", "policy"}, {"split"})
    split = r["split"]
    if isinstance(split, list):  # a plain list means equal weights
        split = {v: 1 for v in split}
    if not isinstance(split, dict) or not split:
        raise ConfigError(f"{where}.split: expected a mapping of variant -> weight")
    for v, w in split.items():
        if v not in variants:
            raise ConfigError(f"{where}.split: unknown variant {v!r}; variants: {sorted(variants)}")
        _number(f"{where}.split.{v}", w)
    total = sum(split.values())
    if total <= 0:
        raise ConfigError(f"{where}.split: the weights sum to 0")
    if not math.isfinite(total):  # 1e308 each: every weight would become 0 and the route pick nothing
        raise ConfigError(f"{where}.split: the weights are too large to add up; use fractions or percentages")
    split = {v: w / total for v, w in split.items()}
    shadow = None
    if r.get("shadow") is not None:
        sh = _keys(f"{where}.shadow", r["shadow"], {"variant", "fraction"}, {"variant", "fraction"})
        if sh["variant"] not in variants:
            raise ConfigError(f"{where}.shadow.variant: unknown variant {sh['variant']!r}; variants: {sorted(variants)}")
        frac = _number(f"{where}.shadow.fraction", sh["fraction"])
        if frac > 1:
            raise ConfigError(f"{where}.shadow.fraction: expected 0..1, got {frac}")
        if {v for v, w in split.items() if w > 0} == {sh["variant"]}:
            raise ConfigError(f"{where}.shadow.variant: {sh['variant']!r} already answers every request of the "
                              "route (the whole split), so it has nothing to be compared with; shadow another "
                              "variant, or drop the shadow")
        shadow = ShadowConfig(sh["variant"], float(frac))
    fallback = r.get("fallback")
    if fallback is not None:
        if fallback not in variants:
            raise ConfigError(f"{where}.fallback: unknown variant {fallback!r}; variants: {sorted(variants)}")
        if {v for v, w in split.items() if w > 0} == {fallback}:
            raise ConfigError(f"{where}.fallback: {fallback!r} is the whole split, so it cannot stand in for "
                              "itself; name another variant with the same classes, or drop the fallback")
    control = r.get("control")
    if control is not None and (not isinstance(control, str) or control not in split):
        raise ConfigError(f"{where}.control: {control!r} is not a variant of the split; the control is the "
                          f"variant the others are compared with (split: {', '.join(split)})")
    from .experiments.policy import parse_policy  # here: it reads the parsed split and control

    try:
        policy = None if r.get("policy") is None else parse_policy(where, r["policy"], split, control)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return RouteConfig(name, split, shadow, fallback, control, policy)


def unrouted(variants: dict[str, Any], routes: dict[str, RouteConfig]) -> list[str]:
    """Served variants that no route's split or shadow names."""
    return [v for v in variants if not any(v in r.variants for r in routes.values())]


def parse_config(data: Any, source: str = "<dict>") -> ServingConfig:
    """Validate a loaded YAML document into a ServingConfig; raises ConfigError naming the problem."""
    top = _keys(source, data, {"server", "variants", "routes", "default_route"}, {"variants", "routes"})

    server = parse_server(top.get("server") or {}, source)

    variants_raw = top["variants"]
    if not isinstance(variants_raw, dict) or not variants_raw:
        raise ConfigError(f"{source}: variants: expected a non-empty mapping of name -> settings")
    variants = {}
    for name, v in variants_raw.items():
        where = f"variants.{name}"
        if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"{where}: variant names are letters, digits, '-' and '_'")
        v = _keys(where, v, {"model", "engine", "gpu", "threads", "workers", "max_batch_size",
                                   "max_latency_ms", "calls_in_flight", "placement", "max_inflight", "workers_at",
                                   "resolve_every_s"}, {"model"})
        if not isinstance(v["model"], str) or not v["model"]:
            raise ConfigError(f"{where}.model: expected a store tag such as 'b0-fashion-mnist:latest'")
        kw: dict[str, Any] = {"name": name, "model": v["model"]}
        if "engine" in v:
            if not isinstance(v["engine"], str):
                raise ConfigError(f"{where}.engine: expected an engine name")
            kw["engine"] = v["engine"]
        if "gpu" in v:
            kw["gpu"] = _number(f"{where}.gpu", v["gpu"])
        if "placement" in v:
            if v["placement"] not in PLACEMENTS:
                raise ConfigError(f"{where}.placement: expected {' or '.join(PLACEMENTS)}, got {v['placement']!r}")
            kw["placement"] = v["placement"]
        if "threads" in v:
            kw["threads"] = _number(f"{where}.threads", v["threads"], integer=True)
        for key in ("workers", "max_batch_size", "max_latency_ms", "calls_in_flight", "max_inflight"):
            if key in v:
                kw[key] = _number(f"{where}.{key}", v[key], integer=True, positive=True)
        if "workers_at" in v:
            from .worker_addresses import parse_workers_at

            if kw.get("placement", "worker") != "worker":
                raise ConfigError(f"{where}.workers_at: a variant placed in the gateway has no workers elsewhere")
            kw["workers_at"] = parse_workers_at(f"{where}.workers_at", v["workers_at"])
        if "resolve_every_s" in v:
            kw["resolve_every_s"] = _number(f"{where}.resolve_every_s", v["resolve_every_s"], positive=True)
        variants[name] = VariantConfig(**kw)

    routes_raw = top["routes"]
    if not isinstance(routes_raw, dict) or not routes_raw:
        raise ConfigError(f"{source}: routes: expected a non-empty mapping of name -> settings")
    from .cascade import files_beside  # a cascade's thresholds file lies beside the configuration file
    routes = {name: parse_route(name, files_beside(r, source), variants) for name, r in routes_raw.items()}

    default_route = top.get("default_route") or next(iter(routes))
    if default_route not in routes:
        raise ConfigError(f"default_route: unknown route {default_route!r}; routes: {sorted(routes)}")
    unused = unrouted(variants, routes)
    if unused:
        raise ConfigError(f"variants {unused} are in no route; add them to a route's split or shadow, or remove them")

    from engines.threads import available_cores

    budget = server.cpu_threads or available_cores()
    for name, v in list(variants.items()):
        if v.threads > budget:
            raise ConfigError(f"variants.{name}.threads: {v.threads} is more than the {budget} CPU threads available")
        if v.workers > budget:
            # Lowered rather than refused, so the default configuration (lite0: 2) also starts on 1 core.
            log.warning("variants.%s.workers: %d processes on %d CPU threads; each batch needs one, so only %d "
                        "can run at once: using %d", name, v.workers, budget, budget, budget)
            variants[name] = replace(v, workers=budget)
    if not server.max_inflight:  # the backstop sits above every variant's share (service/admission.py)
        server = replace(server, max_inflight=sum(v.resolved_max_inflight for v in variants.values())
                         + server.burst_inflight)
    return ServingConfig(variants=variants, routes=routes, default_route=default_route, server=server, source=source)


def load_config(path: str | os.PathLike | None = None) -> ServingConfig:
    p = config_path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"serving configuration {p} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"serving configuration {p} is a folder; give the YAML file") from None
    except (OSError, UnicodeDecodeError) as e:  # unreadable, or not text
        raise ConfigError(f"serving configuration {p} cannot be read as text: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"serving configuration {p} is not valid YAML: {e}") from None
    return parse_config(data, source=str(p))


def check_label_spaces(cfg: ServingConfig, classes: dict[str, list[str]]) -> None:
    """Every variant of a route must have the route's classes (those of its first variant).

    `classes` maps variant -> class names from its manifest; raises ConfigError naming the variant.
    """
    for route in cfg.routes.values():
        first = route.variants[0]
        for v in route.variants[1:]:
            if v in classes and first in classes and classes[v] != classes[first]:
                a, b = classes[v], classes[first]
                raise ConfigError(
                    f"route {route.name!r}: variant {v!r} ({cfg.variants[v].model}) has {len(a)} classes "
                    f"{a[:4]}{'...' if len(a) > 4 else ''}, but the route's are those of {first!r} "
                    f"({cfg.variants[first].model}): {len(b)} classes {b[:4]}{'...' if len(b) > 4 else ''}. "
                    "A route's variants must share one label space."
                )
