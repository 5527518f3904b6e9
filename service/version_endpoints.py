"""The admin endpoints of versions (service/versions.py): load, share, promote, roll back, unload.

Closed as route changes are (service/live_routes.admin_refusal: the admin token and a Host header that
names this server), and every attempt is written to the audit log. GET is open, as GET /variants is.
"""
from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from .audit import configured_token, write_request
from .errors import ClientError, error_response, request_id
from .live_routes import MAX_CHANGE_BYTES, admin_refusal


def _gateway() -> Any:
    import bentoml

    return bentoml.get_current_service()


def _percent(body: dict, key: str = "share") -> float:
    """A share given in percent (0-100), as a fraction."""
    value = body.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
        raise ClientError(f"{key} is a percentage from 0 to 100, got {json.dumps(value)[:40]}", 400)
    return float(value) / 100


async def _admin(request: Request, action: str, act) -> JSONResponse:
    """Check the caller, read the JSON body, run `act(body)` and audit the attempt, whatever its result."""
    rid, variant = request_id(), request.path_params["variant"]
    status, answer, body = 200, None, None
    try:
        local = (request.scope.get("server") or (None,))[0]
        refused = admin_refusal(request.headers.get("host"), local, request.headers.get("authorization"),
                                configured_token())
        if refused:
            raise ClientError(refused[1], refused[0])
        raw = await request.body()
        if len(raw) > MAX_CHANGE_BYTES:
            raise ClientError("a version change is a small JSON object; this body is above 64 kB", 413)
        try:
            body = json.loads(raw or b"{}")
        except ValueError as e:
            raise ClientError(f"the body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise ClientError("the body is a JSON object, such as {\"share\": 10}")
        answer = await act(body)
        status = 202 if answer.pop("accepted", False) else 200
        resp = JSONResponse(answer, status_code=status, headers={"X-Request-Id": rid})
    except ClientError as e:
        status, resp = e.status, error_response(rid, e.status, str(e))
    write_request(request, rid, status, json.loads(resp.body)["error"] if status >= 400 else None,
                  variant=variant, action=action, version=request.path_params.get("version"), change=body)
    return resp


def _described(variant: str, accepted: bool = False, **extra: Any) -> dict:
    return {**_gateway().versions.describe(variant), **extra, **({"accepted": True} if accepted else {})}


async def list_versions(request: Request) -> JSONResponse:
    try:
        return JSONResponse(_gateway().versions.describe(request.path_params["variant"]))
    except ClientError as e:
        return error_response(request_id(), e.status, str(e))


async def load_version(request: Request) -> JSONResponse:
    variant = request.path_params["variant"]

    async def act(body: dict) -> dict:
        unknown = set(body) - {"tag", "share"}
        if unknown or not isinstance(body.get("tag"), str) or not body["tag"]:
            raise ClientError("send {\"tag\": \"NAME:VERSION\"} (a store tag), and \"share\" (percent) if it is to "
                              "take traffic once ready" + (f"; unknown keys {sorted(unknown)}" if unknown else ""))
        v = await _gateway().versions.load(variant, body["tag"], _percent(body))
        return _described(variant, accepted=True, loading=v.tag)

    return await _admin(request, "load", act)


async def change_version(request: Request) -> JSONResponse:
    variant, version = request.path_params["variant"], request.path_params["version"]

    async def act(body: dict) -> dict:
        versions = _gateway().versions
        if set(body) == {"promote"} and body["promote"] is True:
            versions.promote(variant, version)
        elif set(body) == {"share"}:
            versions.set_share(variant, version, _percent(body))
        else:
            raise ClientError("send {\"share\": PERCENT} or {\"promote\": true}")
        return _described(variant)

    return await _admin(request, "promote" if b'"promote"' in await request.body() else "share", act)


async def unload_version(request: Request) -> JSONResponse:
    variant, version = request.path_params["variant"], request.path_params["version"]

    async def act(body: dict) -> dict:
        v = _gateway().versions.unload(variant, version)
        return _described(variant, accepted=True, unloading=v.tag)

    return await _admin(request, "unload", act)


async def rollback(request: Request) -> JSONResponse:
    variant = request.path_params["variant"]

    async def act(body: dict) -> dict:
        if body:
            raise ClientError("a rollback takes no body: it makes the previous default the default again")
        back = _gateway().versions.rollback(variant)
        return _described(variant, rolled_back_to=back.tag)

    return await _admin(request, "rollback", act)
