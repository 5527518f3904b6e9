"""The `server:` section of the serving configuration: limits, timeouts, transports, keys, logging.

Its defaults stand here with their reasons; `parse_server` validates the section, naming the key.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config_checks import ConfigError, check_keys, check_number

READINESS_POLICIES = ("all", "routes")  # ServerConfig.readiness


@dataclass(frozen=True)
class ServerConfig:
    max_body_mb: float = 10  # whole request body; above -> 413
    max_pixels: int = 40_000_000  # per image, read from the header before decoding
    # Declared pixels of all the images being decoded at once; more wait their turn. Bounds the memory:
    # 16 concurrent batches of 6000x6000 PNGs peak at 1.5 GB with it, 4.1 GB at 8 without (benchmarks/serving.md).
    max_decoding_pixels: int = 100_000_000
    max_batch_images: int = 32  # images in one /classify_batch request
    max_top_k: int = 100  # top_k is also capped by the model's class count
    # Classify requests in the gateway at once, all variants together; above -> 429. A backstop only:
    # 0 = the variants' own caps plus the burst pool (service/admission.py), so it never refuses one route
    # because another is busy.
    max_inflight: int = 0
    # Requests still receiving their bodies (they hold no in-flight slot); above -> 429. A body that
    # has not fully arrived after body_timeout_s is answered 408.
    max_uploads: int = 256
    body_timeout_s: float = 30
    timeout_s: float = 60  # BentoML's per-request timeout (504), a backstop behind the two above
    cpu_threads: int = 0  # inference threads shared by all CPU workers; 0 = the cores available
    retry_after_s: int = 1  # what 429/503 answers tell clients to wait
    # PATCH /routes changes: "persist" (saved, served again after a restart; service/route_state.py)
    # or "memory" (a restart serves the file's routes).
    route_changes: str = "persist"
    # BentoML's OpenTelemetry middleware on every request: off (default) skips it; on leaves tracing to
    # BentoML's own configuration (BENTOML_CONFIG: tracing.exporter_type, sample_rate...). Its spans
    # cost about 15% of the gateway's CPU per request even at sample rate 0 (benchmarks/serving.md).
    tracing: bool = False
    # How the gateway hands a batch of decoded images to a worker process: "shared_memory" (the batch is
    # written once into an anonymous shared-memory file that the worker maps, and the HTTP call carries
    # only references to it; service/shm.py) or "http" (the batch pickled into the call's body). Shared
    # memory falls back to http, with a log line, where it cannot be used (no memfd, a worker on another
    # host or in another container).
    worker_transport: str = "shared_memory"
    # Requests that variants past their own max_inflight may borrow; one variant may hold at most
    # burst_share of it, so a burst on one route always leaves room for the others (service/admission.py).
    burst_inflight: int = 64
    burst_share: float = 0.5
    # How often every worker replica is asked whether it answers, and how long it has to answer before it
    # is marked down (service/health.py): a hung worker is down within the two together. A down replica is
    # asked again at the same pace (probed back); a busy one that answers calls is not marked down.
    health_interval_s: float = 0.5
    health_timeout_s: float = 1.0
    # Connecting to a worker: a listening socket that accepts nothing fails the call after this.
    connect_timeout_s: float = 1.0
    # GET /readyz overall: "all" (every variant serves) or "routes" (every route has a variant that serves,
    # its fallback included); GET /readyz/VARIANT answers for one variant either way.
    readiness: str = "all"
    # Seconds a connection may take to send its request line and headers (none in uvicorn): slow or
    # stalled clients otherwise hold a file descriptor each, forever (service/connections.py).
    header_timeout_s: float = 10
    # Seconds an idle keep-alive connection stays open between requests (uvicorn's timeout_keep_alive).
    keepalive_timeout_s: float = 5
    # Open client connections to the gateway; a new one above it closes the connection that has waited
    # longest for its headers or idled longest, else gets 503: file descriptors stay for the workers.
    max_connections: int = 2048
    # Request bodies buffered in the gateway at once, in MiB; a body that would go above it gets 429 +
    # Retry-After, as max_uploads does: max_uploads x max_body_mb (2.5 GB) is more than a host may have.
    max_buffered_mb: float = 256
    # On SIGTERM, seconds to finish the admitted requests before stopping (service/drain.py): under
    # Kubernetes' default 30 s termination grace, so the pod ends before it would be killed.
    drain_grace_s: float = 25
    # Log lines as BentoML writes them ("text", with the request's ids appended) or one JSON object a line
    # ("json"), for a log pipeline that parses fields (service/request_log.py).
    log_format: str = "text"
    # The experiment records (service/experiments/backends.py): "" = the state folder's SQLite file; a path,
    # sqlite:///PATH, or postgresql://... for a database that several gateways share
    experiments_db: str = ""
    # POST /feedback needs the admin token: "auto" (when a route's policy moves its traffic by feedback:
    # bandit, promote, budget on online accuracy), "token" (always) or "none"
    feedback_auth: str = "auto"
    # Worker processes run this much nicer than the gateway (service/priority.py): when inference fills
    # every core, the gateway still gets the CPU to refuse, route, health-check and answer /readyz at once.
    # 0 = the same priority.
    worker_nice: int = 5
    # Gateway threads that decode big uploads run this much nicer than its event loop (service/decode.py):
    # a burst of big images waits behind the other routes' requests, not ahead of them.
    decode_nice: int = 5
    # Client API keys (service/keys.py): the file of `name: sha256-hex` lines (or $EFFNET_API_KEYS_FILE); ""
    # with no variable = keys off, as for a local `make serve`. It is read again when it changes, looked at
    # at most every api_keys_poll_s, so a rotated Kubernetes secret needs no restart.
    api_keys: str = ""
    api_keys_poll_s: float = 1.0
    # Each key's quota unless its line in the file sets its own (service/quota.py): requests a second
    # (a token bucket holding one second's worth) and requests at once; 0 = unlimited.
    api_key_requests_per_s: float = 0
    api_key_concurrent: int = 0
    # Key names that get their own label on effnet_key_requests_total; later ones count as "other", so a
    # file of thousands of keys cannot blow up the metrics' series.
    api_key_metric_names: int = 50

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def max_buffered_bytes(self) -> int:
        return int(self.max_buffered_mb * 1024 * 1024)


def tracing_options(server: ServerConfig) -> dict:
    """`bentoml.service(tracing=...)` for every service of the server: skip every URL unless tracing is on."""
    return {} if server.tracing else {"excluded_urls": [".*"]}

def parse_server(raw: Any, source: str) -> ServerConfig:
    """The `server:` mapping -> ServerConfig; raises ConfigError naming the key."""
    server_raw = check_keys(f"{source}: server", raw, {
        "max_body_mb", "max_pixels", "max_decoding_pixels", "max_batch_images", "max_top_k", "max_inflight",
        "max_uploads", "body_timeout_s", "timeout_s", "cpu_threads", "retry_after_s", "route_changes",
        "tracing", "worker_transport", "burst_inflight", "burst_share", "health_interval_s", "health_timeout_s",
        "connect_timeout_s", "readiness", "header_timeout_s", "keepalive_timeout_s", "max_connections",
        "max_buffered_mb", "drain_grace_s", "log_format", "worker_nice", "decode_nice", "experiments_db",
        "feedback_auth", "api_keys", "api_keys_poll_s", "api_key_requests_per_s",
        "api_key_concurrent", "api_key_metric_names"})
    s = {}
    if "max_body_mb" in server_raw:
        s["max_body_mb"] = check_number("server.max_body_mb", server_raw["max_body_mb"], positive=True)
    for key in ("max_pixels", "max_decoding_pixels", "max_batch_images", "max_top_k", "max_inflight", "max_uploads",
                "retry_after_s"):
        if key in server_raw:
            s[key] = check_number(f"server.{key}", server_raw[key], integer=True, positive=key != "max_inflight")
    if "burst_inflight" in server_raw:
        s["burst_inflight"] = check_number("server.burst_inflight", server_raw["burst_inflight"], integer=True)
    if "burst_share" in server_raw:
        s["burst_share"] = check_number("server.burst_share", server_raw["burst_share"])
        if s["burst_share"] > 1:
            raise ConfigError(f"{source}: server.burst_share: expected 0..1, got {s['burst_share']}")
    for key in ("timeout_s", "body_timeout_s", "health_interval_s", "health_timeout_s", "connect_timeout_s",
                "drain_grace_s"):
        if key in server_raw:
            s[key] = check_number(f"server.{key}", server_raw[key], positive=True)
    if "cpu_threads" in server_raw and server_raw["cpu_threads"] not in (None, "auto"):
        s["cpu_threads"] = check_number("server.cpu_threads", server_raw["cpu_threads"], integer=True, positive=True)
    for key, allowed in (("readiness", READINESS_POLICIES), ("route_changes", ("persist", "memory")),
                         ("worker_transport", ("shared_memory", "http")), ("log_format", ("text", "json")),
                         ("feedback_auth", ("auto", "token", "none"))):
        if key in server_raw:
            if server_raw[key] not in allowed:
                raise ConfigError(f"{source}: server.{key}: expected {' or '.join(allowed)}, got {server_raw[key]!r}")
            s[key] = server_raw[key]
    if "tracing" in server_raw:
        if not isinstance(server_raw["tracing"], bool):
            raise ConfigError(f"{source}: server.tracing: expected true or false, got {server_raw['tracing']!r}")
        s["tracing"] = server_raw["tracing"]
    for key in ("header_timeout_s", "keepalive_timeout_s", "max_buffered_mb"):
        if key in server_raw:
            s[key] = check_number(f"server.{key}", server_raw[key], positive=True)
    if "max_connections" in server_raw:
        s["max_connections"] = check_number("server.max_connections", server_raw["max_connections"], integer=True,
                                       positive=True)
    if "experiments_db" in server_raw:
        if not isinstance(s.setdefault("experiments_db", server_raw["experiments_db"]), str):
            raise ConfigError(f"{source}: server.experiments_db: expected a path or a URL, got {s['experiments_db']!r}")
    for key in ("worker_nice", "decode_nice"):
        if key in server_raw:
            s[key] = check_number(f"server.{key}", server_raw[key], integer=True)
            if not 0 <= s[key] <= 19:
                raise ConfigError(f"{source}: server.{key}: expected 0..19, got {s[key]}")
    if "api_keys" in server_raw:
        if not isinstance(server_raw["api_keys"], str):
            raise ConfigError(f"{source}: server.api_keys: expected the path of the keys file, got {server_raw['api_keys']!r}")
        s["api_keys"] = server_raw["api_keys"]
    for key in ("api_keys_poll_s", "api_key_requests_per_s"):
        if key in server_raw:
            s[key] = check_number(f"server.{key}", server_raw[key], positive=key == "api_keys_poll_s")
    for key in ("api_key_concurrent", "api_key_metric_names"):
        if key in server_raw:
            s[key] = check_number(f"server.{key}", server_raw[key], integer=True, positive=key == "api_key_metric_names")
    server = ServerConfig(**s)
    if server.max_buffered_bytes < server.max_body_bytes:
        raise ConfigError(f"{source}: server.max_buffered_mb ({server.max_buffered_mb:g}) must be at least "
                          f"server.max_body_mb ({server.max_body_mb:g}), or a body at the limit is never accepted")
    if server.body_timeout_s >= server.timeout_s:
        raise ConfigError(f"{source}: server.body_timeout_s ({server.body_timeout_s:g}) must be below server.timeout_s "
                          f"({server.timeout_s:g}), or BentoML's 504 answers slow uploads before the 408 does")
    return server
