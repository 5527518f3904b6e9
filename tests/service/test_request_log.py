"""Request ids on the answer and on every log line about the request (service/request_log.py)."""
import asyncio
import io
import json
import logging

import pytest

from service import request_log
from service.errors import error_response, request_id


def _run(app, headers=()):
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    mw = request_log.RequestLogMiddleware(app)
    asyncio.run(mw({"type": "http", "path": "/classify", "headers": list(headers)}, receive, send))
    return sent


@pytest.fixture
def captured():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("effnet.test-request-log")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield logger, handler, stream
    logger.removeHandler(handler)


def test_the_answer_and_every_log_line_carry_the_servers_id_and_the_upstream_one(captured):
    logger, handler, stream = captured
    handler.addFilter(request_log.RequestIdFilter())
    seen = {}

    async def app(scope, receive, send):
        seen["rid"] = request_id()
        logger.info("decoding %s", "x.png")
        logger.warning("a library's line, 100% sure")
        await error_response(request_id(), 400, "bad")(scope, receive, send)

    sent = _run(app, [(b"x-request-id", b"edge-42%s")])
    rid = seen["rid"]
    assert len(rid) == 32 and rid != "edge-42%s"  # made by the server, not taken from the client
    lines = stream.getvalue().splitlines()
    assert lines == [f"INFO decoding x.png request_id={rid} upstream_id=edge-42%s",
                     f"WARNING a library's line, 100% sure request_id={rid} upstream_id=edge-42%s"]
    start = sent[0]
    headers = dict(start["headers"])
    assert headers[b"x-request-id"] == rid.encode() and headers[b"x-upstream-id"] == b"edge-42%s"
    assert json.loads(sent[1]["body"])["request_id"] == rid
    logger.info("after the request")
    assert stream.getvalue().splitlines()[-1] == "INFO after the request"


def test_each_request_gets_an_id_of_its_own():
    ids = []

    async def app(scope, receive, send):
        ids.append(request_id())
        await error_response(request_id(), 400, "bad")(scope, receive, send)

    _run(app)
    _run(app)
    assert len(set(ids)) == 2 and request_log.REQUEST_ID.get() is None


def test_json_lines_name_the_ids_as_fields(captured):
    logger, handler, stream = captured
    handler.addFilter(request_log.RequestIdFilter(append=False))
    handler.setFormatter(request_log.JsonFormatter())

    async def app(scope, receive, send):
        logger.info("routed to %s", "b0")
        await error_response(request_id(), 400, "bad")(scope, receive, send)

    _run(app, [(b"x-request-id", b"abc")])
    line = json.loads(stream.getvalue())
    assert line["message"] == "routed to b0" and line["upstream_id"] == "abc" and len(line["request_id"]) == 32
    assert line["level"] == "INFO" and line["at"].endswith("Z")


def test_an_upstream_id_is_bounded_and_printable():
    assert request_log.clean_upstream(b"a" * 1000) == "a" * request_log.MAX_UPSTREAM_ID
    assert request_log.clean_upstream(b"ok\r\nforged: 1") == "okforged: 1"
    assert request_log.clean_upstream(b"") is None


def test_the_log_format_is_text_or_json():
    from service.config import ConfigError, parse_config
    from tests.service.fakes import CFG

    assert parse_config(CFG).server.log_format == "text"
    assert parse_config({**CFG, "server": {"log_format": "json"}}).server.log_format == "json"
    with pytest.raises(ConfigError, match="log_format: expected text or json"):
        parse_config({**CFG, "server": {"log_format": "xml"}})
