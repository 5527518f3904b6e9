"""The gateway's routes: one table of path, method, handler and document (service.openapi).

The classify endpoints are Starlette routes mounted on the BentoML service rather than typed
`@bentoml.api` methods, because BentoML's multipart parsing decides the status of bad input itself
(500 for a text field where a file is expected, after fetching it as a URL) and reads any body size;
here every failure has its status and message. BentoML still serves /livez, /readyz (the gateway's
`__is_ready__`), /metrics and the API page at / (its document at /docs.json).
"""
from __future__ import annotations

import json
import os
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse
from starlette.routing import Route

from . import openapi
from .errors import ClientError, error_response, request_id
from .live_routes import ADMIN_TOKEN_ENV, MAX_CHANGE_BYTES, admin_refusal
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
    return JSONResponse({"client_id": client, "route": a.route, "variant": a.variant,
                         "model": gw.cfg.variants[a.variant].model, "assignment": a.how,
                         "weights": gw.cfg.routes[a.route].split})


async def change_route(request: Request) -> JSONResponse:
    gw, rid = _gateway(), request_id()
    proxied = any(h in request.headers for h in ("forwarded", "x-forwarded-for", "x-real-ip"))
    refused = admin_refusal(request.client.host if request.client else None,
                            request.headers.get("authorization"), os.environ.get(ADMIN_TOKEN_ENV), proxied)
    if refused:
        return error_response(rid, *refused)
    body = await request.body()
    if len(body) > MAX_CHANGE_BYTES:
        return error_response(rid, 413, "a route change is a small JSON object; this body is above 64 kB")
    try:
        change = json.loads(body or b"null")
    except ValueError as e:
        return error_response(rid, 400, f"the body is not JSON: {e}")
    try:
        return JSONResponse(gw.change_route(request.path_params["name"], change), headers={"X-Request-Id": rid})
    except ClientError as e:
        return error_response(rid, e.status, str(e))


async def variant_ready(request: Request) -> JSONResponse:
    """GET /readyz/VARIANT: 200 while the variant serves, else 503 with why (service/readiness.py)."""
    name = request.path_params["variant"]
    try:
        body = _gateway().variant_readiness(name)
    except KeyError:
        return error_response(request_id(), 404, f"unknown variant {shown(name)}; variants: "
                                                  f"{', '.join(_gateway().cfg.variants)}")
    return JSONResponse(body, status_code=200 if body["ready"] else 503)


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
    Endpoint("/docs", "GET", docs, openapi.DOCS),
    Endpoint("/readyz/{variant}", "GET", variant_ready, openapi.READYZ_VARIANT),
]

http_app = Starlette(exception_handlers={405: method_not_allowed},
                     routes=[Route(e.path, e.handler, methods=[e.method]) for e in ENDPOINTS])
