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


def test_a_coalesced_call_carries_its_own_requests_ids_to_the_worker():
    """Two requests batched into one call: the call's task has both ids (not the ids of whichever
    request started it), and a worker call made in it sends them as W3C baggage, which the worker's
    middleware reads back for its own log lines."""
    import numpy as np
    from opentelemetry import propagate

    from service.coalesce import Coalescer
    from service.results import InferenceResult

    seen = {}

    async def send(batch):
        with request_log.propagated():
            headers: dict = {}
            propagate.inject(headers)  # what BentoML's client does with each call's headers
        seen["ids"], seen["headers"] = request_log.current_ids(), headers
        await asyncio.sleep(0)
        return InferenceResult(np.zeros((len(batch), 2), dtype=np.float32), 0.0)

    async def main():
        c = Coalescer(send, max_batch=8, limit=1)

        async def request(rid, up):
            request_log.REQUEST_ID.set(rid)
            request_log.UPSTREAM_ID.set(up)
            return await c(np.zeros((1, 3), dtype=np.uint8))

        blocker = asyncio.Event()

        async def first_send(batch):  # holds the only call slot so the next two are batched together
            await blocker.wait()
            return InferenceResult(np.zeros((len(batch), 2), dtype=np.float32), 0.0)

        c.send = first_send
        t0 = asyncio.create_task(request("r0", None))
        await asyncio.sleep(0)
        t1, t2 = asyncio.create_task(request("r1", "edge-1")), asyncio.create_task(request("r2", None))
        await asyncio.sleep(0)
        c.send = send
        blocker.set()
        await asyncio.gather(t0, t1, t2)

    asyncio.run(main())
    assert seen["ids"] == ("r1,r2", "edge-1")
    baggage = seen["headers"]["baggage"]
    assert request_log.from_baggage(baggage.encode()) == ("r1,r2", "edge-1")

    got = {}

    async def worker_app(scope, receive, send):
        got["ids"] = request_log.current_ids()

    mw = request_log.RequestLogMiddleware(worker_app, ids=False)
    asyncio.run(mw({"type": "http", "headers": [(b"baggage", baggage.encode())]}, None, None))
    assert got["ids"] == ("r1,r2", "edge-1") and request_log.current_ids() == (None, None)


def test_baggage_from_elsewhere_is_ignored_and_ids_are_bounded_and_printable():
    assert request_log.from_baggage(b"userId=alice,serverNode=DF%2028") == (None, None)
    rid, up = request_log.from_baggage(b"effnet-request-ids=" + b"a" * 5000 + b",effnet-upstream-ids=x%0Ay%22z")
    assert len(rid) == request_log.MAX_BAGGAGE and up == "xyz"
