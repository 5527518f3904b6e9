"""Serving: a BentoML gateway over one worker service per served variant.

Modules, one concern each:
- `app`: what `bentoml serve` imports: builds the services from the configuration;
- `config`: the YAML configuration (variants, routes, limits), validated into dataclasses with the defaults;
- `gateway`: the request path, parse -> route -> decode -> dispatch -> answer (`GatewayService`);
- `endpoints`: the route table (path, method, handler, document) and the Starlette app;
- `http_limits`: body size and time, in-flight and upload limits, cancelling requests whose client left;
- `forms`: the multipart form and its fields; `errors`: the error answer and `ClientError`;
- `routing`: which variant answers a request (explicit, sticky split, random split, shadow), pure;
- `images`, `decode`: bytes -> the variant's uint8 input, with the limits that keep bad input a 4xx;
- `dispatch`: per variant, coalescing (`coalesce`), replica choice, retries, transport (`shm`), in-process
  variants (`inprocess`); `results`: `InferenceResult`, what a worker answers;
- `shadow`: mirrored requests; `readiness`: `/readyz` and the variant info series;
- `live_routes`, `route_state`: PATCH /routes/NAME, its checks, and the changes saved across restarts;
- `describe`: GET /variants and /routes; `openapi`: the API document;
- `workers`, `cpu_slots`, `heap`: the per-variant worker services, the shared CPU budget, the collector;
- `metrics`: the `effnet_*` Prometheus series;
- `cli`: `effnet serve`; `bench`: the serving benchmark.
"""
