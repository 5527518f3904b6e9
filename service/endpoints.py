"""The gateway's routes: one table of path, method, handler and document (service.openapi).

The classify endpoints are Starlette routes mounted on the BentoML service rather than typed
`@bentoml.api` methods, because BentoML's multipart parsing decides the status of bad input itself
(500 for a text field where a file is expected, after fetching it as a URL) and reads any body size;
here every failure has its status and message. BentoML still serves /livez, /readyz (the gateway's
`__is_ready__`), /metrics and the API page at / (its document at /docs.json).
"""
from __future__ import annotations

import json
import math
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse
from starlette.routing import Route

from . import oip, openapi, route_state, version_endpoints
from .audit import configured_token, write_request
from .errors import ClientError, error_response, request_id
from .live_routes import MAX_CHANGE_BYTES, admin_refusal
from .openapi import Endpoint
from .routing import RoutingError, shown


def _gateway() -> Any:
    """The running gateway service (service.gateway.GatewayService)."""
    import bentoml

    return bentoml.get_current_service()


async def classify(request: Request) -> JSONResponse:
    return await _gateway().classify(request)


async def classify_batch(request: Request) -> JSONResponse:
    return await _gateway().classify_batch(request)


async def variants(request: Request) -> JSONResponse:
    return JSONResponse({"variants": _gateway().describe_variants()})


async def routes(request: Request) -> JSONResponse:
    return JSONResponse(_gateway().describe_routes())


async def assignment(request: Request) -> JSONResponse:
    """Which variant a client id gets in a route, without classifying anything."""
    gw, rid = _gateway(), request_id()
    client = request.headers.get("x-client-id") or request.query_params.get("client_id")
    unknown = set(request.query_params) - {"route", "client_id"}
    if unknown:
        return error_response(rid, 400, f"unknown query parameter(s) {sorted(unknown)}; parameters: client_id, route")
    if not client:
        return error_response(rid, 400, "send the client id as the X-Client-Id header or ?client_id=: without one, "
                                        "each request is assigned at random")
    try:
        a = gw.router.assign(request.query_params.get("route"), None, client)
    except RoutingError as e:
        return error_response(rid, 400, str(e))
    policy = gw.cfg.routes[a.route].policy
    if policy is not None and math.isinf(policy.every_s):  # budget, cascade: no variant per client
        kind = next(iter(policy.as_dict()))
        return JSONResponse({"client_id": client, "route": a.route, "variant": None, "model": None,
                             "assignment": kind, "weights": gw.cfg.routes[a.route].split,
                             "why": f"route {a.route!r} chooses per request ({kind} policy): no client keeps a "
                                    "variant; each answer names the one that answered"})
    return JSONResponse({"client_id": client, "route": a.route, "variant": a.variant,
                         "model": gw.cfg.variants[a.variant].model, "assignment": a.how,
                         "weights": gw.cfg.routes[a.route].split})


def _audit(request: Request, rid: str, name: str, before: dict | None, after: Any, status: int,
           error: str | None = None) -> None:
    """One line of the audit log for a route-change attempt (service.audit.write_request)."""
    write_request(request, rid, status, error, route=name, before=before, after=after)


async def change_route(request: Request) -> JSONResponse:
    gw, rid, name = _gateway(), request_id(), request.path_params["name"]
    old = gw.cfg.routes.get(name)
    before = route_state.route_dict(old) if old else None

    def refuse(status: int, message: str, after: Any = None) -> JSONResponse:
        _audit(request, rid, name, before, after, status, message)
        return error_response(rid, status, message)

    local = (request.scope.get("server") or (None,))[0]
    refused = admin_refusal(request.headers.get("host"), local, request.headers.get("authorization"),
                            configured_token())
    if refused:
        return refuse(*refused)
    body = await request.body()
    if len(body) > MAX_CHANGE_BYTES:
        return refuse(413, "a route change is a small JSON object; this body is above 64 kB")
    try:
        change = json.loads(body or b"null")
    except ValueError as e:
        return refuse(400, f"the body is not JSON: {e}")
    try:
        answer = gw.change_route(name, change)
    except ClientError as e:
        return refuse(e.status, str(e), change)
    _audit(request, rid, name, before, route_state.route_dict(gw.cfg.routes[name]), 200)
    return JSONResponse(answer, headers={"X-Request-Id": rid})


async def variant_ready(request: Request) -> JSONResponse:
    """GET /readyz/VARIANT: 200 while the variant serves, else 503 with why (service/readiness.py)."""
    name = request.path_params["variant"]
    try:
        body = _gateway().variant_readiness(name)
    except KeyError:
        return error_response(request_id(), 404, f"unknown variant {shown(name)}; variants: "
                                                  f"{', '.join(_gateway().cfg.variants)}")
    return JSONResponse(body, status_code=200 if body["ready"] else 503)


async def feedback(request: Request) -> JSONResponse:
    """POST /feedback (service/experiments/live.py); with the admin token where feedback moves traffic."""
    rid, gw = request_id(), _gateway()
    if gw.experiments.needs_token():
        local = (request.scope.get("server") or (None,))[0]
        token = configured_token()
        refused = admin_refusal(request.headers.get("host"), local, request.headers.get("authorization"), token)
        if refused and not token:
            refused = (403, "feedback is closed: it moves traffic on a route with a policy, and the server has no "
                            "admin token to check it with; set $EFFNET_ADMIN_TOKEN or start it with `effnet serve`")
        if refused:
            return error_response(rid, *refused)
    try:
        body = await gw.experiments.feedback(await request.body())
    except ClientError as e:
        return error_response(rid, e.status, str(e), getattr(e, "headers", None))
    return JSONResponse(body, headers={"X-Request-Id": rid})


async def experiments(request: Request) -> JSONResponse:
    """GET /experiments and /experiments/ROUTE."""
    try:
        history = request.query_params.get("history", "0").lower()
        if history not in ("0", "1", "true", "false"):
            raise ClientError(f"history must be 1 or 0 (true or false), not {history[:20]!r}", 400)
        return JSONResponse(await _gateway().experiments.results(request.path_params.get("route"),
                                                                 history in ("1", "true")))
    except ClientError as e:
        return error_response(request_id(), e.status, str(e))


async def docs(request: Request) -> RedirectResponse:
    """BentoML 1.4 shows its Swagger UI at `/` (the document at `/docs.json`); `/docs` is where FastAPI
    and most services put it."""
    return RedirectResponse("/", status_code=307)


async def method_not_allowed(request: Request, exc: Exception) -> JSONResponse:
    """Our JSON error shape for a known path asked with the wrong method (Starlette's own is plain text)."""
    # Starlette builds Allow from a set, in no stable order: sorted here.
    listed = (getattr(exc, "headers", None) or {}).get("Allow", "")
    allow = ", ".join(sorted(m.strip() for m in listed.split(",") if m.strip()))
    return error_response(request_id(), 405, f"{request.method} is not allowed on {request.url.path}; use {allow}",
                          {"Allow": allow})


ENDPOINTS = [
    Endpoint("/classify", "POST", classify, openapi.CLASSIFY),
    Endpoint("/classify_batch", "POST", classify_batch, openapi.CLASSIFY_BATCH),
    Endpoint("/variants", "GET", variants, openapi.VARIANTS),
    Endpoint("/routes", "GET", routes, openapi.ROUTES),
    Endpoint("/routes/{name}", "PATCH", change_route, openapi.CHANGE_ROUTE),
    Endpoint("/assignment", "GET", assignment, openapi.ASSIGNMENT),
    # versions of a variant, live (service/versions.py)
    Endpoint("/variants/{variant}/versions", "GET", version_endpoints.list_versions, openapi.VERSIONS),
    Endpoint("/variants/{variant}/versions", "POST", version_endpoints.load_version, openapi.LOAD_VERSION),
    Endpoint("/variants/{variant}/versions/{version}", "PATCH", version_endpoints.change_version,
             openapi.CHANGE_VERSION),
    Endpoint("/variants/{variant}/versions/{version}", "DELETE", version_endpoints.unload_version,
             openapi.UNLOAD_VERSION),
    Endpoint("/variants/{variant}/rollback", "POST", version_endpoints.rollback, openapi.ROLLBACK),
    Endpoint("/docs", "GET", docs, openapi.DOCS),
    Endpoint("/readyz/{variant}", "GET", variant_ready, openapi.READYZ_VARIANT),
    Endpoint("/feedback", "POST", feedback, openapi.FEEDBACK),
    Endpoint("/experiments", "GET", experiments, openapi.EXPERIMENTS),
    Endpoint("/experiments/{route}", "GET", experiments, openapi.EXPERIMENT),
    # the Open Inference Protocol (service/oip.py)
    Endpoint("/v2", "GET", oip.server_metadata, openapi.OIP_SERVER),
    Endpoint("/v2/health/live", "GET", oip.server_live, openapi.OIP_LIVE),
    Endpoint("/v2/health/ready", "GET", oip.server_ready, openapi.OIP_READY),
    Endpoint("/v2/models/{name}", "GET", oip.metadata, openapi.OIP_MODEL),
    Endpoint("/v2/models/{name}/versions/{version}", "GET", oip.metadata, openapi.OIP_MODEL_V),
    Endpoint("/v2/models/{name}/ready", "GET", oip.ready, openapi.OIP_MODEL_READY),
    Endpoint("/v2/models/{name}/versions/{version}/ready", "GET", oip.ready, openapi.OIP_MODEL_READY_V),
    Endpoint("/v2/models/{name}/infer", "POST", oip.infer_route, openapi.OIP_INFER),
    Endpoint("/v2/models/{name}/versions/{version}/infer", "POST", oip.infer_route, openapi.OIP_INFER_V),
]

http_app = Starlette(exception_handlers={405: method_not_allowed},
                     routes=[Route(e.path, e.handler, methods=[e.method]) for e in ENDPOINTS])
