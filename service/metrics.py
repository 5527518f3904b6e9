"""The `effnet_*` Prometheus series (documented in docs/operations.md).

Plain prometheus_client (`bentoml.metrics` is deprecated). `bentoml serve` starts every process with
PROMETHEUS_MULTIPROC_DIR set, so these write to its shared files and the gateway's /metrics shows the
series of every process beside BentoML's own `bentoml_service_*`. Gauges say how to merge processes
(`max`: no per-process label). Info is a gauge set to 1, as `Info` does not work across processes.
"""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.4, 0.6, 1.0, 1.5, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
SCORE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)

# gateway
REQUESTS = Counter(
    "effnet_requests", "Classified images by outcome: HTTP status of the image's answer (a /classify_batch "
    "item counts alone); variant/route are 'none' when the request failed before routing",
    ["endpoint", "route", "variant", "status"],
)
IN_GATEWAY = Gauge(
    "effnet_gateway_requests", "Classify requests in the gateway now: 'uploading' (body still arriving, no "
    "in-flight slot yet), 'processing' (holding one of server.max_inflight), 'decode_waiting' (images waiting "
    "for room in server.max_decoding_pixels)", ["state"], multiprocess_mode="livesum",
)
E2E_LATENCY = Histogram(
    "effnet_request_duration_seconds", "Gateway time per request, from the body received to the answer ready",
    ["endpoint", "route", "variant"], buckets=LATENCY_BUCKETS,
)
QUEUE_WAIT = Histogram(
    "effnet_queue_wait_seconds", "Time a request spent between the gateway and its batch's start: "
    "transport, batching queue and the wait for the CPU",
    ["route", "variant"], buckets=LATENCY_BUCKETS,
)
ASSIGNMENTS = Counter(
    "effnet_split_assignments", "Routing decisions by how the variant was chosen (explicit, split, default)",
    ["route", "variant", "assignment"],
)
SHADOW = Counter(
    "effnet_shadow_requests", "Mirrored requests by whether the shadow's top-1 agreed with the primary's "
    "(result: agree, disagree, error)",
    ["route", "variant", "primary", "result"],
)
CASCADE_STAGES = Counter(
    "effnet_cascade_stages", "Cascade stages run (service/cascade.py) by outcome: answered, escalated (unsure: "
    "the image went on to the next stage) or failed (down, busy, failing or too slow: escalated too)",
    ["route", "variant", "outcome"],
)
TOP1_SCORE = Histogram(
    "effnet_top1_score", "Softmax score of the top-1 class of each answered image (primary answers only)",
    ["route", "variant"], buckets=SCORE_BUCKETS,
)
VARIANT_INFO = Gauge(
    "effnet_variant_info", "1 for every served variant, its description in the labels",
    ["variant", "route", "model", "params", "macs", "top1", "resolution", "device", "engine", "precision"],
    multiprocess_mode="max",
)
SPLIT_WEIGHT = Gauge(
    "effnet_split_weight", "Each route's current split weight per variant (0 once removed from the split); "
    "changes with PATCH /routes/NAME", ["route", "variant"], multiprocess_mode="mostrecent",
)
FEEDBACK = Counter(
    "effnet_feedback", "Feedback taken on an experiment's answers, by whether the answer was right (a shadow's "
    "answer counts under the shadow variant)",
    ["route", "variant", "correct"],
)
ONLINE_ACCURACY = Gauge(
    "effnet_online_accuracy", "Each experiment variant's accuracy on its labelled answers (POST /feedback): the "
    "estimate and the bounds of its 95% Wilson interval (bound: estimate, low, high); shadow=\"true\": the variant's "
    "mirrored answers. Counted in the experiment database, as GET /experiments counts them",
    ["route", "variant", "shadow", "bound"], multiprocess_mode="mostrecent",
)
ACCURACY_BOUNDS = ("estimate", "low", "high")  # the `bound` label of ONLINE_ACCURACY
BUDGET_CHOICES = Counter(
    "effnet_budget_choices", "Variants chosen by a route's latency-budget policy (service/budget.py)",
    ["route", "variant"],
)
BUDGET_MISSES = Counter(
    "effnet_budget_misses", "Budget-policy answers that missed their budget, by why: none_fits (no variant's "
    "prediction fitted, the fastest answered) or late (it was predicted to fit and answered later)",
    ["route", "variant", "why"],
)
ROUTE_CHANGES = Counter(
    "effnet_route_changes", "Accepted live changes of a route's split or shadow (PATCH /routes/NAME)", ["route"],
)
VERSION_IMAGES = Counter(
    "effnet_version_images", "Images answered by each version of a variant that serves several (service/versions.py)",
    ["variant", "version"],
)
VERSION_SHARE = Gauge(
    "effnet_version_share", "Each loaded version's share of its variant's requests (the default's is what the "
    "others leave); 0 for one that is not ready", ["variant", "version"],
)
WORKER_CALLS = Counter(
    "effnet_worker_calls", "Gateway -> worker calls by how the batch travelled: shared_memory (service/shm.py) or "
    "http (in the call's body: worker_transport http, a batch that did not fit a free slot, or a fallback)",
    ["variant", "transport"],
)
VARIANT_READY = Gauge(
    "effnet_variant_ready", "1 when the variant's worker has loaded and verified its checkpoint and the gateway's "
    "health check finds it serving, else 0",
    ["variant"], multiprocess_mode="min",  # min: 0 until every process of the variant has loaded
)
VARIANT_INFLIGHT = Gauge(
    "effnet_variant_inflight", "Classify requests admitted to each variant now, its own places and those borrowed "
    "from the burst pool together (service/admission.py)", ["variant"], multiprocess_mode="livesum",
)
REPLICA_UP = Gauge(
    "effnet_replica_up", "1 while a worker replica answers the gateway's health checks and calls, 0 while it is "
    "marked down (service/health.py); replica is 1, 2, ... in service.workers.worker_names order",
    ["variant", "replica"], multiprocess_mode="livemax",
)
REPLICA_DOWN = Counter(
    "effnet_replica_down", "Times a worker replica was marked down, by why (exited, health_check, deadline, "
    "connection)", ["variant", "why"],
)
# every process (service/heap.py)
GC_PAUSE = Histogram(
    "effnet_gc_pause_seconds", "Pauses of Python's garbage collector per serving process (the gateway's or a "
    "worker's service name), the variant it serves ('none': the gateway), and generation (2: a full "
    "collection, which stops every request of that process)",
    ["process", "variant", "generation"], buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
)
GC_FROZEN = Gauge(
    "effnet_gc_frozen_objects", "Objects built at start-up that the process moved out of the collector's passes "
    "(gc.freeze) once ready", ["process", "variant"], multiprocess_mode="max",
)

# workers
INFERENCE_LATENCY = Histogram(
    "effnet_inference_duration_seconds", "Worker time per batch: the engine call, uint8 batch in, scores out",
    ["variant", "device"], buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "effnet_batch_size", "Images per batch that a worker ran (BentoML's adaptive batching)",
    ["variant"], buckets=BATCH_BUCKETS,
)
BATCH_THREADS = Counter(
    "effnet_inference_batches", "Batches a CPU worker ran, by inference threads (all of the variant's "
    "threads when the cores were free, one when they were busy: service.cpu_slots)",
    ["variant", "threads"],
)

# client keys (service/key_guard.py)
KEY_REQUESTS = Counter(
    "effnet_key_requests", "Requests to the key-guarded endpoints by client key and outcome: admitted, "
    "unauthorized (no key or an unknown one; key \"none\"), over_rate or over_concurrent (429). key is the key's "
    "name in the keys file, never the key; names past server.api_key_metric_names count as \"other\"",
    ["key", "outcome"],
)
