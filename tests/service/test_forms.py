"""Reading a classify form (service/forms.py): a body above PARSE_APART_BYTES is parsed in a thread, and
gives the same form, and the same refusals, as a small one parsed in the event loop."""
import warnings

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

with warnings.catch_warnings():  # starlette asks for httpx2 for its test client; httpx is what is installed
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from service import forms
from service.errors import ClientError


async def read(request):
    try:
        f = await forms.read_form(request, forms.BATCH_FIELDS, max_batch_images=2)
    except ClientError as e:
        return JSONResponse({"error": str(e)}, status_code=e.status)
    files = [(u.filename, len(await u.read())) for u in f.form.getlist("images")]
    return JSONResponse({"files": files, "route": f.route, "top_k": f.top_k})


@pytest.fixture(scope="module")
def client():
    with TestClient(Starlette(routes=[Route("/", read, methods=["POST"])])) as c:
        yield c


@pytest.mark.parametrize("size", [1000, forms.PARSE_APART_BYTES + 1000])
def test_a_big_body_gives_the_form_a_small_one_gives(client, size):
    r = client.post("/", files=[("images", ("a.png", b"x" * size)), ("images", ("b.png", b"y"))],
                    data={"route": "fashion", "top_k": "3"})
    assert r.status_code == 200, r.text
    assert r.json() == {"files": [["a.png", size], ["b.png", 1]], "route": "fashion", "top_k": "3"}


@pytest.mark.parametrize("size", [1000, forms.PARSE_APART_BYTES + 1000])
def test_a_big_body_is_refused_as_a_small_one_is(client, size):
    r = client.post("/", files=[("images", (f"{i}.png", b"x" * size)) for i in range(4)])
    assert r.status_code == 400 and "too many files" in r.json()["error"], r.text
    r = client.post("/", files=[("images", ("a.png", b"x" * size))], data={"colour": "red"})
    assert r.status_code == 400 and "unknown field" in r.json()["error"], r.text


def test_a_big_body_is_parsed_apart_from_the_event_loop(client, monkeypatch):
    import threading

    seen = []
    parse = forms._parse_apart

    async def spy(request, body, max_files, max_fields):
        seen.append(threading.current_thread().name)
        return await parse(request, body, max_files, max_fields)

    monkeypatch.setattr(forms, "_parse_apart", spy)
    client.post("/", files=[("images", ("a.png", b"x" * 10))])
    assert seen == []  # a small body stays in the loop
    assert client.post("/", files=[("images", ("a.png", b"x" * (forms.PARSE_APART_BYTES + 1)))]).status_code == 200
    assert len(seen) == 1
