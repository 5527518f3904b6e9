"""The API document (service.openapi) and the route table (service.endpoints) agree, and the page is ours."""
import asyncio
import json

import pytest

from service.endpoints import ENDPOINTS, http_app
from service.openapi import INFO, OpenAPIMiddleware, paths

METHODS = {"get", "post", "put", "patch", "delete"}


def served(app=http_app) -> set[tuple[str, str]]:
    """(path, method) of every route the Starlette app serves (HEAD is Starlette's own, with GET)."""
    return {(r.path, m.lower()) for r in app.routes for m in r.methods if m != "HEAD"}


def documented(spec_paths: dict) -> set[tuple[str, str]]:
    return {(p, m) for p, item in spec_paths.items() for m in item if m in METHODS}


def disagreements(app, spec_paths: dict) -> tuple[set, set]:
    """Routes served but not documented, and documented but not served."""
    return served(app) - documented(spec_paths), documented(spec_paths) - served(app)


def test_every_route_is_documented_and_every_documented_route_is_served():
    assert disagreements(http_app, paths(ENDPOINTS)) == (set(), set())


def test_a_route_without_its_document_or_a_document_without_its_route_is_caught():
    from starlette.applications import Starlette
    from starlette.routing import Route

    more = Starlette(routes=[*http_app.routes, Route("/forgotten", lambda r: None, methods=["GET"])])
    assert disagreements(more, paths(ENDPOINTS)) == ({("/forgotten", "get")}, set())
    assert disagreements(http_app, {**paths(ENDPOINTS), "/gone": {"post": {}}}) == (set(), {("/gone", "post")})


@pytest.mark.parametrize("path, method", sorted(documented(paths(ENDPOINTS))))
def test_every_route_documents_its_answers_and_errors(path, method):
    doc = paths(ENDPOINTS)[path][method]
    assert doc["summary"] and doc["responses"]
    if path != "/docs":
        assert "200" in doc["responses"] or "202" in doc["responses"]
    if doc.get("parameters") or doc.get("requestBody"):  # what takes input says how it refuses it
        assert any(code.startswith("4") for code in doc["responses"])
    for name in (p["name"] for p in doc.get("parameters", []) if p["in"] == "path"):
        assert "{" + name + "}" in path


def test_route_changes_are_documented_as_they_behave():
    text = json.dumps(paths(ENDPOINTS)["/routes/{name}"]["patch"])
    assert "served again after a restart" in text and "a restart serves the file again" not in text


def run_docs(body: bytes) -> dict:
    async def bentoml_app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    sent = []

    async def send(message):
        sent.append(message)

    mw = OpenAPIMiddleware(bentoml_app, paths(ENDPOINTS))
    asyncio.run(mw({"type": "http", "path": "/docs.json", "method": "GET", "headers": []}, None, send))
    out = sent[1]["body"]
    assert dict(sent[0]["headers"])[b"content-length"] == str(len(out)).encode()
    return json.loads(out)


def test_the_document_carries_our_title_version_and_description_and_keeps_bentomls_health_routes():
    bentoml_spec = {"info": {"title": "effnet-gateway", "version": "None", "contact": {"name": "BentoML Team"},
                             "description": "# effnet-gateway:dev\n\nThis is a Machine Learning Service created with BentoML."},
                    "paths": {"/livez": {"get": {}}, "/readyz": {"get": {}}, "/metrics": {"get": {}}}}
    spec = run_docs(json.dumps(bentoml_spec).encode())
    assert spec["info"] == INFO and INFO["title"] and INFO["version"] not in ("None", "")
    assert "BentoML" not in json.dumps(spec["info"])
    assert {"/livez", "/readyz", "/metrics"} <= set(spec["paths"])
    assert documented(spec["paths"]) >= served()


def test_the_page_at_the_root_is_ours_with_bentomls_swagger_files_and_nothing_else_of_it():
    from service.openapi import API_PAGE, TITLE

    async def bentoml_app(scope, receive, send):
        raise AssertionError("BentoML's own page is not served")

    sent = []

    async def send(message):
        sent.append(message)

    asyncio.run(OpenAPIMiddleware(bentoml_app, {})({"type": "http", "path": "/", "method": "GET", "headers": []},
                                                   None, send))
    page = sent[1]["body"].decode()
    assert sent[0]["status"] == 200 and sent[1]["body"] == API_PAGE
    assert f"<title>{TITLE}</title>" in page and "./docs.json" in page and "swagger-ui-bundle.js" in page
    assert "googletagmanager" not in page and "github.com/bentoml" not in page and "BentoML" not in page
