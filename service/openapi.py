"""The API document (`/docs.json`, shown at `/`): our title, version and description, and every route.

The gateway's routes are plain Starlette routes (service.endpoints), which BentoML does not document:
each route's entry in the route table carries its document, and `OpenAPIMiddleware` puts them, with
our own `info`, into the document BentoML serves. BentoML's own `/livez`, `/readyz`, `/healthz` and
`/metrics` stay as BentoML documents them. The page at `/` is ours too (`API_PAGE`): BentoML's shows
its own name, hides the document's title, and loads a tag manager and a link to BentoML's repository;
ours renders the same Swagger UI, from the files BentoML serves, with our title.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .budget import FITS, NONE_FITS, UNMEASURED
from .budget import HEADER as BUDGET_HEADER
from .forms import DEFAULT_TOP_K

TITLE = "EfficientNet image classification"
DESCRIPTION = """\
Classify images with the EfficientNet variants of the serving configuration.

- `POST /classify` one image, `POST /classify_batch` several; the answer names the route, the variant
  that answered and the top-k classes.
- A route splits its traffic between variants by weight; `X-Client-Id` keeps one client on one
  variant while the weights stay the same (`GET /assignment` says which).
- `GET /variants` and `GET /routes` describe what is served; `PATCH /routes/{name}` changes a route
  while serving.
- Errors are JSON, `{"error": ..., "request_id": ...}`, with the request id also in `X-Request-Id`;
  429 and 503 come with `Retry-After`.
"""


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("effnet-serving")
    except PackageNotFoundError:  # served from a copy of the sources (a bento) rather than installed
        return "dev"


INFO = {"title": TITLE, "version": version(), "description": DESCRIPTION}
TAG = {"name": "Service APIs", "description": "Classification, routes and variants"}


@dataclass(frozen=True)
class Endpoint:
    """One route of the gateway: what the Starlette app serves and what the document says of it."""
    path: str
    method: str
    handler: Callable[..., Any]
    doc: dict[str, Any] = field(repr=False)


def paths(endpoints: list[Endpoint]) -> dict[str, dict]:
    """The OpenAPI `paths` of the route table."""
    out: dict[str, dict] = {}
    for e in endpoints:
        out.setdefault(e.path, {})[e.method.lower()] = {"tags": ["Service APIs"], **e.doc}
    return out


# answers ------------------------------------------------------------------------------------------------

_ERROR_BODY = {"application/json": {"schema": {
    "type": "object", "properties": {"error": {"type": "string"}, "request_id": {"type": "string"}}}}}
_MEANING = {
    "400": "the request is wrong: the message says what to send instead",
    "401": "the admin token is missing or wrong",
    "403": "no admin token is configured (changes are closed), or the Host header names another server",
    "404": "no such route (or request, or the route runs no experiment)",
    "409": "this request already has feedback: the first is kept",
    "410": "the answer is older than the feedback window",
    "408": "the body did not arrive within server.body_timeout_s",
    "413": "the body is above server.max_body_mb, or an image above server.max_pixels",
    "415": "a compressed body (Content-Encoding): send it as it is",
    "429": "too many requests for the variant (variants.X.max_inflight and its share of server.burst_inflight) "
           "or uploading (max_uploads); see Retry-After",
    "500": "a fault of the server's; the message names the request id in its log",
    "502": "the variant's worker failed",
    "503": "the variant is down, not ready or at capacity (max_latency_ms cannot be met); see Retry-After",
}


def errors(*codes: str) -> dict[str, dict]:
    return {c: {"description": _MEANING[c], "content": _ERROR_BODY} for c in codes}


def ok(description: str, schema: dict | None = None) -> dict:
    return {"200": {"description": description, **({"content": {"application/json": {"schema": schema}}}
                                                     if schema else {})}}


_S, _N, _I = {"type": "string"}, {"type": "number"}, {"type": "integer"}
_WEIGHTS = {"type": "object", "additionalProperties": _N, "description": "variant -> weight (sums to 1)"}
_SHADOW = {"type": "object", "nullable": True, "properties": {"variant": _S, "fraction": _N}}
# with assignment budget (service/budget.py)
_BUDGET_FIELDS = {"budget_ms": _N, "predicted_ms": {**_N, "nullable": True, "description": "null: not measured yet"},
                  "chosen_because": {"type": "string", "enum": [FITS, UNMEASURED, NONE_FITS]},
                  "budget_missed": {"type": "boolean", "description": "none fitted, or the answer came late"}}
_BUDGET = {"name": BUDGET_HEADER, "in": "header", "required": False, "schema": {**_N, "exclusiveMinimum": 0},
           "description": "on a route with policy budget: the most accurate variant predicted to answer within "
                          "this many ms (default: the route's default_ms); ignored by other routes"}
_PREDICTION = {"type": "object", "properties": {
    "request_id": _S, "route": _S, "variant": _S, "model": _S,
    "version": {**_S, "description": "the exact store tag (name:version) of the checkpoint that answered"},
    "assignment": {"type": "string", "enum": ["explicit", "split", "default", "fallback", "budget"]},
    "instead_of": {**_S, "description": "with assignment fallback: the variant picked, which is down"},
    "predictions": {"type": "array", "items": {"type": "object", "properties": {
        "label": _S, "index": _I, "score": _N}}},
    "latency_ms": _N, **_BUDGET_FIELDS}}
# A cascade route's answer (service/cascade.py): every stage run, and with average_last the stages averaged.
_PREDICTION["properties"]["assignment"]["enum"].append("cascade")
_PREDICTION["properties"].update({
    "cascade": {"type": "array", "description": "with assignment cascade: the stages run, in order", "items": {
        "type": "object", "properties": {
            "variant": _S, "top1": _S, "index": _I, "score": {**_N, "description": "its calibrated top-1 probability"},
            "threshold": {**_N, "nullable": True, "description": "escalated below it; null for the last stage"},
            "escalated": {"type": "boolean"}, "error": {**_S, "description": "why the stage did not answer"}}}},
    "averaged": {"type": "array", "items": _S, "description": "the stages whose probabilities were averaged"}})
_FIELDS = {"variant": {"type": "string", "description": "explicit variant (GET /variants)"},
           "route": {"type": "string", "description": "route (GET /routes); default: the default route"},
           "top_k": {"type": "integer", "minimum": 1, "default": DEFAULT_TOP_K}}
_QUERY_FIELDS = [{"name": n, "in": "query", "required": False, "schema": s,
                  "description": "as the form field of the same name (give it once)"} for n, s in _FIELDS.items()]
_CLIENT_ID = {"name": "X-Client-Id", "in": "header", "required": False, "schema": _S,
              "description": "sticky split key: one client, one variant while the weights stay the same"}
_CLASSIFY_ERRORS = errors("400", "408", "413", "415", "429", "500", "502", "503")


def _multipart(required: str, files: dict) -> dict:
    return {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": [required], "properties": {required: files, **_FIELDS}}}}}


CLASSIFY = {
    "summary": "Classify one image", "parameters": [_CLIENT_ID, _BUDGET, *_QUERY_FIELDS],
    "requestBody": _multipart("image", {"type": "string", "format": "binary"}),
    "responses": {**ok("top-k predictions", _PREDICTION), **_CLASSIFY_ERRORS}}
CLASSIFY_BATCH = {
    "summary": "Classify several images; a bad image fails only its item",
    "parameters": [_CLIENT_ID, _BUDGET, *_QUERY_FIELDS],
    "requestBody": _multipart("images", {"type": "array", "items": {"type": "string", "format": "binary"}}),
    "responses": {**ok("one result per image, in order: the prediction, or the item's status and error", {
        "type": "object", "properties": {
            "request_id": _S, "route": _S, "variant": _S, "assignment": _S, "latency_ms": _N,
            "results": {"type": "array", "items": {"type": "object", "properties": {
                "index": _I, "filename": _S, "status": _I, "error": _S, **_PREDICTION["properties"]}}}}}),
        **_CLASSIFY_ERRORS}}
VARIANTS = {
    "summary": "Served variants: routes, weights, placement, device, engine, params, MACs, offline top-1, readiness",
    "responses": ok("variants", {"type": "object", "properties": {"variants": {"type": "array", "items": {
        "type": "object", "properties": {
            "variant": _S, "model": _S, "routes": {"type": "array", "items": _S}, "weights": _WEIGHTS,
            "placement": {"type": "string", "enum": ["worker", "gateway"]},
            "worker_transport": {"type": "string", "enum": ["shared_memory", "http", "in_process"]},
            "device": _S, "engine": _S, "precision": _S, "threads": _I, "workers": _I, "workers_loaded": _I,
            "calls_in_flight": _I, "max_batch_size": _I, "max_latency_ms": _I, "resolution": _I,
            "num_classes": _I, "params": _I, "macs": _I, "offline_top1": _N, "ready": {"type": "boolean"},
            "problem": _S,
            "workers_at": {"type": "object", "nullable": True, "description": "workers elsewhere: as configured "
                           "(workers_at), the addresses resolved, the last resolution's failure"},
            "versions": {"type": "array", "description": "each version served: tag, share, state, offline top-1, "
                         "images answered (GET /variants/{variant}/versions)", "items": {"type": "object"}}}}}}})}
_ROUTE = {"type": "object", "properties": {
    "split": _WEIGHTS, "variants": {"type": "array", "items": _S}, "shadow": _SHADOW, "num_classes": _I,
    "changed_at": {"type": "string", "nullable": True,
                   "description": "when a live change made the route differ from the configuration file"}}}
ROUTES = {
    "summary": "Routes, split weights and shadows",
    "responses": ok("routes", {"type": "object", "properties": {
        "default_route": _S, "routes": {"type": "object", "additionalProperties": _ROUTE}, "config": _S,
        "route_changes": {"type": "string", "enum": ["persist", "memory"]}, "route_changes_file": _S}})}
CHANGE_ROUTE = {
    "summary": "Change a route's split weights and/or shadow while serving",
    "description": "With the admin token (`$EFFNET_ADMIN_TOKEN`, else the token file that `effnet serve` "
                   "names at start) sent as `Authorization: Bearer <token>`, and a Host header that names "
                   "this server; closed when no token is configured. Every attempt is written to the audit "
                   "log in the state folder. With `server.route_changes: persist` (the default) the "
                   "change is saved and served again after a restart, until the route is edited in the "
                   "configuration file or `effnet serve --reset-routes` forgets it; with `memory`, a restart "
                   "serves the configuration file's routes.",
    "parameters": [{"name": "name", "in": "path", "required": True, "schema": _S},
                   {"name": "Authorization", "in": "header", "required": True, "schema": _S,
                    "description": "Bearer <the admin token>"}],
    "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object", "properties": {
        "split": {"type": "object", "additionalProperties": _N,
                  "description": "variant -> weight (normalised); a list means equal weights"},
        "shadow": {**_SHADOW, "description": "null removes the shadow"}}}}}},
    "responses": {**ok("the route as changed, and as it was", {"type": "object", "properties": {
        "route": _S, "previous": _ROUTE, **_ROUTE["properties"], "saved_in": {"type": "string", "nullable": True}}}),
        **errors("400", "401", "403", "404", "500"),
        "413": {"description": "a route change is a small JSON object: the body is above 64 kB", "content": _ERROR_BODY}}}
_ADMIN = ("With the admin token as `Authorization: Bearer <token>` and a Host header that names this server, as "
          "PATCH /routes/NAME; every attempt is written to the audit log, and the versions are loaded again after a "
          "restart. ")
_VARIANT_P = {"name": "variant", "in": "path", "required": True, "schema": _S, "description": "a served variant"}
_VERSION_P = {"name": "version", "in": "path", "required": True, "schema": _S,
              "description": "the version's store tag, or the part after its colon"}
_TOKEN_H = {"name": "Authorization", "in": "header", "required": True, "schema": _S,
            "description": "Bearer <the admin token>"}
_VERSIONS = {"type": "object", "properties": {
    "variant": _S, "default": {**_S, "description": "the version that takes what the shares leave"},
    "previous": {**_S, "nullable": True, "description": "what POST .../rollback returns to"},
    "versions": {"type": "array", "items": {"type": "object", "properties": {
        "tag": _S, "version": _S, "configured": {"type": "boolean"}, "default": {"type": "boolean"},
        "share": {**_N, "nullable": True, "description": "of the variant's requests (0-1); null for the default"},
        "state": {"type": "string", "enum": ["loading", "ready", "down", "failed", "draining"]},
        "error": {**_S, "nullable": True}}}}}}
_SHARE = {**_N, "minimum": 0, "maximum": 100, "description": "percent of the variant's requests"}
_VERSION_ERRORS = {**errors("400", "401", "403", "404"),
                   "409": {"description": "not possible in the version's state (loading, failed, the default, shares "
                                          "above 100%, a checkpoint of other classes or input)", "content": _ERROR_BODY}}
VERSIONS = {"summary": "A variant's versions: each one's share, state and whether it is the default",
            "parameters": [_VARIANT_P], "responses": {**ok("the versions", _VERSIONS), **errors("404")}}
LOAD_VERSION = {
    "summary": "Load another checkpoint of a variant into workers of its own, while serving",
    "description": _ADMIN + "202 at once: the version is `loading` until its worker has verified and loaded it, "
                   "and takes `share` percent of the variant's requests from then on (0: none until PATCHed).",
    "parameters": [_VARIANT_P, _TOKEN_H],
    "requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": ["tag"], "properties": {"tag": _S, "share": _SHARE}}}}},
    "responses": {"202": {"description": "loading", "content": {"application/json": {"schema": _VERSIONS}}},
                  **_VERSION_ERRORS}}
CHANGE_VERSION = {
    "summary": "Set a version's share of its variant (a canary), or promote it to the default",
    "description": _ADMIN + "Promoting drops every share to 0; the old default stays loaded for a rollback.",
    "parameters": [_VARIANT_P, _VERSION_P, _TOKEN_H],
    "requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "properties": {"share": _SHARE, "promote": {"type": "boolean", "enum": [True]}}}}}},
    "responses": {**ok("the versions", _VERSIONS), **_VERSION_ERRORS}}
UNLOAD_VERSION = {
    "summary": "Unload a version: no traffic from now on, its workers stop once their calls are done",
    "description": _ADMIN + "Not the default, nor the configured checkpoint.",
    "parameters": [_VARIANT_P, _VERSION_P, _TOKEN_H],
    "responses": {"202": {"description": "draining", "content": {"application/json": {"schema": _VERSIONS}}},
                  **_VERSION_ERRORS}}
ROLLBACK = {
    "summary": "Roll a variant back: the previous default is the default again, every share 0",
    "description": _ADMIN, "parameters": [_VARIANT_P, _TOKEN_H],
    "responses": {**ok("the versions", _VERSIONS), **_VERSION_ERRORS}}
ASSIGNMENT = {
    "summary": "Which variant a client id gets in a route, without classifying anything",
    "description": "The same hash as /classify, so the answer holds while the route's weights do: what an "
                   "A/B analysis joins its outcomes on.",
    "parameters": [{"name": "client_id", "in": "query", "required": False, "schema": _S,
                    "description": "the client id (or send it as X-Client-Id)"},
                   {**_CLIENT_ID, "description": "the client id (or send it as ?client_id=)"},
                   {"name": "route", "in": "query", "required": False, "schema": _S,
                    "description": "route (GET /routes); default: the default route"}],
    "responses": {**ok("the client's variant", {"type": "object", "properties": {
        "client_id": _S, "route": _S, "variant": {**_S, "nullable": True}, "model": {**_S, "nullable": True},
        "assignment": {"type": "string", "enum": ["split", "default", "budget", "cascade"]}, "weights": _WEIGHTS,
        "why": {**_S, "description": "on a route that chooses per request (budget, cascade): why no variant"}}}),
        **errors("400")}}
READYZ_VARIANT = {
    "summary": "Whether one variant serves now, and each worker replica's mark",
    "description": "200 while the variant is ready (a replica that answers its health checks serves it), 503 "
                   "with the reason while it is not; GET /readyz answers for the whole gateway "
                   "(server.readiness). Reads the last health checks: never waits on a worker.",
    "parameters": [{"name": "variant", "in": "path", "required": True, "schema": _S,
                    "description": "a served variant (GET /variants)"}],
    "responses": {**ok("the variant is ready", {"type": "object", "properties": {
        "variant": _S, "ready": {"type": "boolean"}, "problem": {**_S, "nullable": True},
        "replicas": {"type": "array", "items": {"type": "object"}}}}),
        "503": {"description": "the variant is not ready: `problem` says why (the same body as 200)"},
        **errors("404")}}
_FEEDBACK_ITEM = {"type": "object", "required": ["request_id", "label"], "properties": {
    "request_id": {**_S, "description": "the `request_id` of the answer (the server's, never the client's own)"},
    "label": {"oneOf": [_S, _I], "description": "the true class: its name or index"}}}
FEEDBACK = {
    "summary": "The true label of an answer of an experiment (a route with a control)",
    "description": "Acknowledged once committed: a 200 is never lost. One item, or {\"feedback\": [...]} of up to "
                   "1,000 (one result each, with its own status). A shadow's answer to the same request is "
                   "labelled too. Unknown request: 404; feedback already given: 409 (the first is kept); past "
                   "the feedback window: 410.",
    "requestBody": {"required": True, "content": {"application/json": {"schema": {"oneOf": [
        _FEEDBACK_ITEM, {"type": "object", "properties": {"feedback": {"type": "array", "items": _FEEDBACK_ITEM}}}]}}}},
    "responses": {**ok("committed: the answer's route, variant, label and whether it was right"),
                  **errors("400", "404", "409", "410", "413", "503")}}
EXPERIMENTS = {
    "summary": "Every experiment: online accuracy per variant and each against the control",
    "responses": {**ok("{\"experiments\": {route: its result}} (as GET /experiments/{route})")}}
EXPERIMENT = {
    "summary": "One route's experiment: online accuracy per variant and each against the control",
    "description": "Per variant: requests, labelled answers, accuracy with its 95% Wilson interval, latency p50/"
                   "p95/p99; against the control: the difference with an always-valid 95% interval (mSPRT), its "
                   "p-value, the minimum detectable effect at the current sample size, and a status (collecting, "
                   "better, worse, no_difference) that stays valid however often it is looked at.",
    "parameters": [{"name": "route", "in": "path", "required": True, "schema": _S,
                    "description": "a route with a control (GET /routes)"},
                   {"name": "history", "in": "query", "required": False, "schema": {"type": "boolean"},
                    "description": "1: also each variant's cumulative accuracy with its 95% interval as feedback "
                                   "came in, in at most 60 time buckets (`history`)"}],
    "responses": {**ok("the route's experiment"), **errors("400", "404")}}
DOCS = {"summary": "The API page: redirects to /", "responses": {"307": {"description": "to /"}}}


# The Open Inference Protocol (service/oip.py): KServe's v2 protocol, as Triton and KServe serve it.
_TENSOR = {"type": "object", "properties": {"name": _S, "datatype": _S, "shape": {"type": "array", "items": _I},
                                            "parameters": {"type": "object"}, "data": {"type": "array", "items": {}}}}
_MODEL = [{"name": "name", "in": "path", "required": True, "schema": _S,
           "description": "a variant or a route (GET /variants, /routes)"}]
_VERSIONED = [*_MODEL, {"name": "version", "in": "path", "required": True, "schema": _S,
                        "description": "the model's version: 1"}]
_OIP_ERRORS = {**errors("400", "413", "429", "500", "502", "503"),
               "404": {"description": "no such model (variant or route) or version", "content": _ERROR_BODY}}
OIP_SERVER = {"summary": "Open Inference Protocol: server metadata", "responses": ok("name, version, extensions", {
    "type": "object", "properties": {"name": _S, "version": _S, "extensions": {"type": "array", "items": _S}}})}
OIP_LIVE = {"summary": "Open Inference Protocol: the server is live", "responses": ok('{"live": true}')}
OIP_READY = {"summary": "Open Inference Protocol: the server is ready (as GET /readyz)",
             "responses": {**ok('{"ready": true}'), "503": {"description": '{"ready": false, "error": why}'}}}
OIP_MODEL = {"summary": "Open Inference Protocol: model metadata (inputs image/pixels, outputs scores/top_k)",
             "parameters": _MODEL, "responses": {**ok("name, versions, platform, inputs, outputs"),
                                                 "404": _OIP_ERRORS["404"]}}
OIP_MODEL_READY = {"summary": "Open Inference Protocol: the model answers now", "parameters": _MODEL,
                   "responses": {**ok('{"name": ..., "ready": true}'),
                                 "503": {"description": "not ready: `error` says why"}, "404": _OIP_ERRORS["404"]}}
OIP_INFER = {
    "summary": "Open Inference Protocol: classify encoded images (BYTES `image`) or RGB pixels (UINT8 `pixels`)",
    "description": "One input: `image`, BYTES [N], base64 strings in `data` or binary data after the JSON header "
                   "(`Inference-Header-Content-Length`); or `pixels`, UINT8 [N, H, W, 3]. Outputs: `scores`, FP32 "
                   "[N, classes], and `top_k`, BYTES [N, k] of \"score:index:label\" (k: the request's `top_k` "
                   "parameter or the output's `classification` parameter). Routed, limited and counted as /classify.",
    "parameters": [_MODEL[0], _CLIENT_ID, _BUDGET],
    "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object", "properties": {
        "id": _S, "parameters": {"type": "object", "properties": {"top_k": _I}},
        "inputs": {"type": "array", "items": _TENSOR}, "outputs": {"type": "array", "items": {"type": "object"}}}}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
    "responses": {**ok("model_name, model_version, id, parameters (request_id, route, variants), outputs", {
        "type": "object", "properties": {"model_name": _S, "model_version": _S, "id": _S,
                                         "parameters": {"type": "object"}, "outputs": {"type": "array", "items": _TENSOR}}}),
        **_OIP_ERRORS}}
OIP_MODEL_V = {**OIP_MODEL, "parameters": _VERSIONED}
OIP_MODEL_READY_V = {**OIP_MODEL_READY, "parameters": _VERSIONED}
OIP_INFER_V = {**OIP_INFER, "parameters": [*_VERSIONED, _CLIENT_ID, _BUDGET]}

API_PAGE = f"""<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="UTF-8">
  <title>{TITLE}</title>
  <link rel="stylesheet" type="text/css" href="./static_content/swagger-ui.css">
  <link rel="icon" type="image/png" href="./static_content/favicon-light-32x32.png" sizes="32x32">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="./static_content/swagger-ui-bundle.js" charset="UTF-8"></script>
  <script>
    window.onload = () => {{
      window.ui = SwaggerUIBundle({{url: "./docs.json", dom_id: "#swagger-ui", deepLinking: true,
                                   presets: [SwaggerUIBundle.presets.apis], layout: "BaseLayout"}});
    }};
  </script>
</body>
</html>
""".encode()


class OpenAPIMiddleware:
    """Serves our API page at `/`, and rewrites BentoML's `/docs.json`: our `info` and tag, and our routes'
    `paths` added to BentoML's own."""

    def __init__(self, app: Any, paths: dict[str, dict], info: dict[str, str] = INFO) -> None:
        self.app, self.paths, self.info = app, paths, info

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/" and scope["method"] in ("GET", "HEAD"):
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/html; charset=utf-8"), (b"content-length", str(len(API_PAGE)).encode())]})
            await send({"type": "http.response.body", "body": API_PAGE if scope["method"] == "GET" else b""})
            return None
        if scope["type"] != "http" or scope["path"] != "/docs.json":
            return await self.app(scope, receive, send)
        start, chunks = {}, []

        async def capture(message: Any) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            else:
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        body = b"".join(chunks)
        try:
            spec = json.loads(body)
            spec["info"] = dict(self.info)
            spec["tags"] = [TAG if t.get("name") == TAG["name"] else t for t in spec.get("tags", [])] or [TAG]
            spec.setdefault("paths", {}).update(self.paths)
            body = json.dumps(spec).encode()
        except ValueError:
            pass  # not JSON (an error page): pass it through unchanged
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": start.get("status", 200), "headers": headers})
        await send({"type": "http.response.body", "body": body})
