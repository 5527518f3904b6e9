"""Reading a classify request: the multipart form, its text fields (or the query string), the files.

Every problem is a `ClientError` with its status and a message that says what to send instead:
400 for a body that is not multipart, incomplete, or has unknown, repeated or misplaced fields; 415
for a compressed body. What the fields mean (route, variant, top_k) is decided by the pipeline.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request

from .errors import ClientError
from .routing import shown

CLASSIFY_FIELDS = frozenset({"image", "variant", "route", "top_k"})
BATCH_FIELDS = frozenset({"images", "image", "variant", "route", "top_k"})
QUERY_FIELDS = ("variant", "route", "top_k")  # also accepted in the query string (?route=...)
DEFAULT_TOP_K = 5


# A body above this is parsed in a thread of its own, one at a time, not in the event loop: parsing 10 MiB
# of multipart is about 50 ms of pure Python, and a burst of big uploads held the loop for seconds, every
# other route waiting behind it (the chaos run's max-uploads scenario, benchmarks/RESULTS.md). One thread
# at a time leaves the loop half of the interpreter while it parses; small bodies stay in the loop, where
# they cost less than a thread's hop.
PARSE_APART_BYTES = 1 << 20
_PARSING: Any = None  # anyio.CapacityLimiter(1), made in the event loop at its first use


async def _parse_apart(request: Request, body: bytes, max_files: int, max_fields: int) -> Any:
    """The form of `body`, parsed by Starlette's own parser in a thread (with its own event loop)."""
    import asyncio

    import anyio.to_thread
    from starlette.formparsers import MultiPartParser

    global _PARSING
    if _PARSING is None:
        _PARSING = anyio.CapacityLimiter(1)

    async def chunks():
        yield body
        yield b""

    def parse() -> Any:
        return asyncio.run(MultiPartParser(request.headers, chunks(), max_files=max_files,
                                           max_fields=max_fields).parse())

    form = await anyio.to_thread.run_sync(parse, limiter=_PARSING)
    request._form = form  # Starlette closes the form's files with the request, as for request.form()
    return form


@dataclass(frozen=True)
class ClassifyForm:
    form: Any  # starlette FormData: the files are read from it
    variant: str | None
    route: str | None
    top_k: str | None  # as sent; checked against the variant's classes by `top_k`
    client_id: str | None  # X-Client-Id: the sticky split key


async def read_form(request: Request, allowed: frozenset[str], max_batch_images: int) -> ClassifyForm:
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise ClientError("send multipart/form-data with the image as a file field "
                          f"(got content type {ctype or 'none'!r}), e.g. curl -F image=@photo.jpg")
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise ClientError(f"request bodies are not decompressed here (Content-Encoding: {shown(encoding)}); "
                          "send the multipart body as it is: images are compressed already", 415)
    boundary = re.search(r'boundary="?([^";]+)"?', ctype)
    if boundary:
        # The multipart parser drops a part that never ends, which would read as a missing field. The
        # body is already in memory (service.http_limits); Starlette parses the form from this copy.
        body = await request.body()
        if b"--" + boundary.group(1).encode() + b"--" not in body[-(len(boundary.group(1)) + 1024):]:
            raise ClientError("the multipart body is incomplete: it does not end with its closing boundary "
                              f"({len(body):,} bytes arrived; was the upload interrupted?)")
    try:
        if boundary and len(body) > PARSE_APART_BYTES:
            form = await _parse_apart(request, body, max_batch_images + 1, 16)
        else:
            form = await request.form(max_files=max_batch_images + 1, max_fields=16)
    except Exception as e:
        detail = str(getattr(e, "detail", None) or getattr(e, "message", None) or e)
        if detail.startswith("Too many files"):  # Starlette counts the +1 above, which only confuses
            detail = (f"too many files: at most one for /classify and {max_batch_images} "
                      "for /classify_batch (server.max_batch_images)")
        raise ClientError(f"the body is not valid multipart/form-data: {detail}") from None
    unknown = set(form.keys()) - allowed
    if unknown:
        raise ClientError(f"unknown field(s) {shown(sorted(unknown), 200)}; fields: {', '.join(sorted(allowed))}")
    query = request.query_params
    unknown = set(query.keys()) - set(QUERY_FIELDS)
    if unknown:  # refused like unknown fields
        raise ClientError(f"unknown query parameter(s) {shown(sorted(unknown), 200)}; "
                          f"parameters: {', '.join(QUERY_FIELDS)} (or send them as form fields)")
    variant, route, top_k_raw = (_field(form, query, name) for name in QUERY_FIELDS)
    return ClassifyForm(form, variant, route, top_k_raw, request.headers.get("x-client-id") or None)


def _text_field(form: Any, name: str) -> str | None:
    values = form.getlist(name)
    if not values:
        return None
    if len(values) > 1:
        raise ClientError(f"field {name!r} is given {len(values)} times; give it once")
    value = values[0]
    if isinstance(value, UploadFile):
        raise ClientError(f"field {name!r} must be a text value, not a file")
    value = value.strip()
    return value or None


def _field(form: Any, query: Any, name: str) -> str | None:
    """A text field from the form or, as many clients send them, from the query string (?route=...)."""
    in_form = _text_field(form, name)
    if name not in query:
        return in_form
    in_query = _text_field(query, name)
    if in_query is None:  # ?route= with nothing after it says nothing
        return in_form
    if in_form is not None and in_query != in_form:
        raise ClientError(f"{name!r} is given twice, as {shown(in_query)} in the query string and as "
                          f"{shown(in_form)} in the form; give it once")
    return in_query


def top_k(raw: str | None, variant: str, num_classes: int, max_top_k: int) -> int:
    """The number of predictions to answer: `raw` checked, else DEFAULT_TOP_K (both capped by the classes)."""
    k_max = min(max_top_k, num_classes)
    if raw is None:
        return min(DEFAULT_TOP_K, k_max)
    # ASCII digits only: int() would also take "1_0" and other scripts' digits, which no client means.
    if not re.fullmatch(r"\s*\+?[0-9]{1,30}\s*", raw, flags=re.ASCII):
        raise ClientError(f"top_k must be an integer from 1 to {k_max}, got {shown(raw)}")
    k = int(raw)
    if not 1 <= k <= k_max:
        raise ClientError(f"top_k must be from 1 to {k_max} (variant {variant!r} has {num_classes} classes), got {k}")
    return k


def one_image(form: Any) -> UploadFile:
    """/classify's file: exactly one, and a file."""
    files = form.getlist("image")
    if not files:
        raise ClientError("missing file field 'image' (e.g. curl -F image=@photo.jpg)")
    if len(files) > 1:
        raise ClientError(f"/classify takes one image, got {len(files)}; use /classify_batch for several")
    if not isinstance(files[0], UploadFile):
        raise ClientError("field 'image' must be a file (a multipart part with a filename), not a text value")
    return files[0]


def batch_images(form: Any, max_batch_images: int) -> list[Any]:
    """/classify_batch's items, in order (a text item fails alone, later, as a bad image)."""
    files = form.getlist("images") + form.getlist("image")
    if not files:
        raise ClientError("missing file field 'images' (e.g. curl -F images=@a.jpg -F images=@b.png)")
    if len(files) > max_batch_images:
        raise ClientError(f"{len(files)} images is above the limit of {max_batch_images} per request")
    return files
