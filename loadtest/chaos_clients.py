"""The chaos run's clients, in a process of their own (never the server's, never the orchestrator's):

    python -m loadtest.chaos_clients load  SPEC.json OUT.jsonl   # closed-loop streams until stdin closes
    python -m loadtest.chaos_clients burst SPEC.json OUT.json    # N uploads at once, then exit
    python -m loadtest.chaos_clients slow  SPEC.json OUT.json    # N half-sent request lines, held, then closed

The load clients behave as well-behaved clients do: after a 429 or 503 with `Retry-After` they wait that
long (bounded by `retry_cap_s`), after a transport error they pause briefly, and every request has a
deadline. Each request is one record: stream, start (epoch s), latency, status (0: no answer), error kind,
for a 200 the variant and assignment the answer names, for a 429/503 why (`refusal_kind`). Everything is bounded: the streams by
`max_s`, the burst and the slow connections by their counts and timeouts.
"""
from __future__ import annotations

import asyncio
import json
import resource
import sys
import threading
import time
from pathlib import Path

# What a failed request without an HTTP answer was; "reset" is the one the criteria count.
ERROR_KINDS = ("reset", "refused", "timeout", "connect-timeout", "unfinished", "other")


def error_kind(exc: BaseException) -> str:
    import httpx

    if isinstance(exc, httpx.ConnectTimeout):
        return "connect-timeout"
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.ConnectError):
        return "refused"
    # "Server disconnected without sending a response", ECONNRESET on read or write, a broken pipe.
    if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
        return "reset"
    return "other"


def retry_after(headers, cap: float) -> float:
    try:
        return max(0.0, min(float(headers.get("retry-after", "")), cap))
    except ValueError:
        return min(0.5, cap)


async def _post(client, url: str, files: dict, data: dict, headers: dict) -> tuple[int, str, dict, object]:
    """(status, error kind, answer fields, headers) of one POST."""
    try:
        r = await client.post(url, files=files, data=data, headers=headers)
    except Exception as e:  # noqa: BLE001 - every failure is a measurement, never a crash of the clients
        return 0, error_kind(e), {}, {}
    fields = {}
    if r.status_code == 200:
        try:
            body = r.json()
            fields = {"variant": body.get("variant"), "assignment": body.get("assignment")}
        except ValueError:
            fields = {"bad_json": True}
    elif r.status_code in (429, 503):
        fields = {"why": refusal_kind(r)}
    return r.status_code, "", fields, r.headers


def refusal_kind(r) -> str:
    """Why a 429/503 came, from its message: "busy" (the variant is at capacity or overloaded: it serves),
    "drain" (the server is shutting down), else "down" (down, hung past its deadline, not ready)."""
    try:
        message = str(r.json().get("error", ""))
    except (ValueError, AttributeError):
        message = r.text[:200]
    if "at capacity" in message or "overloaded" in message:
        return "busy"
    if "shutting down" in message or "draining" in message:
        return "drain"
    return "down"


async def _client(stream: dict, idx: int, client, url: str, stop: asyncio.Event, record, cap: float) -> None:
    images = [Path(p).read_bytes() for p in stream["images"]]
    data = {k: v for k, v in (("variant", stream.get("variant")), ("route", stream.get("route"))) if v}
    headers = {"X-Client-Id": f"chaos-{stream['name']}-{idx}"}
    n = idx
    while not stop.is_set():
        image = images[n % len(images)]
        n += 1
        files = {"image": (stream.get("filename", "image"), image, stream.get("content_type", "image/png"))}
        t0, m0 = time.time(), time.monotonic()
        try:
            status, err, fields, rh = await _post(client, url, files, data, headers)
        except asyncio.CancelledError:  # still waiting when the run ended: counted, with its wait so far
            record({"s": stream["name"], "t": round(t0, 4), "dt": round(time.monotonic() - m0, 5), "st": 0,
                    "e": "unfinished"})
            raise
        record({"s": stream["name"], "t": round(t0, 4), "dt": round(time.monotonic() - m0, 5), "st": status,
                "e": err, **fields})
        if status in (429, 503):
            await _sleep_or_stop(stop, retry_after(rh, cap))
        elif status == 0:
            await _sleep_or_stop(stop, 0.2)


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    if seconds > 0:
        try:
            await asyncio.wait_for(stop.wait(), seconds)
        except TimeoutError:
            pass


async def run_load(spec: dict, out: Path) -> None:
    """Closed-loop streams until stdin closes (or says "stop") or `max_s` passes; each record is a line of
    `out` as soon as its request ends, so the orchestrator sees a recovery while it happens."""
    import httpx

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def watch_stdin() -> None:
        for line in sys.stdin:
            if line.strip() == "stop":
                break
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch_stdin, daemon=True).start()
    loop.call_later(spec.get("max_s", 600), stop.set)
    url = spec["url"].rstrip("/") + "/classify"
    sink = open(out, "w", buffering=1)  # line-buffered: one write per record

    def record(r: dict) -> None:
        sink.write(json.dumps(r) + "\n")

    clients, tasks = [], []
    for stream in spec["streams"]:
        n = int(stream["clients"])
        if n <= 0:
            continue
        client = httpx.AsyncClient(timeout=httpx.Timeout(spec.get("timeout_s", 30.0), connect=spec.get("connect_s", 5.0)),
                                   limits=httpx.Limits(max_connections=n, max_keepalive_connections=n))
        clients.append(client)
        tasks += [asyncio.create_task(_client(stream, i, client, url, stop, record, spec.get("retry_cap_s", 2.0)))
                  for i in range(n)]
    print("started", flush=True)
    await stop.wait()
    # In-flight requests get `finish_s` to end; those still waiting then are recorded as unfinished, so
    # every request sent is counted and a hung server cannot hold the run for a whole request timeout.
    await asyncio.wait(tasks, timeout=spec.get("finish_s", 3.0))
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for c in clients:
        await c.aclose()
    sink.close()


async def run_burst(spec: dict, out: Path) -> None:
    """`count` uploads of one prepared multipart body at once; statuses, latencies and errors to `out`."""
    import httpx

    body = Path(spec["body"]).read_bytes()
    headers = {"Content-Type": spec["content_type"]}
    url = spec["url"].rstrip("/") + "/classify"
    results: list[dict] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(spec.get("timeout_s", 60.0), connect=10.0),
                                 limits=httpx.Limits(max_connections=spec["count"])) as client:
        async def one() -> None:
            t0, m0 = time.time(), time.monotonic()
            try:
                r = await client.post(url, content=body, headers=headers)
                status, err = r.status_code, ""
            except Exception as e:  # noqa: BLE001
                status, err = 0, error_kind(e)
            results.append({"t": round(t0, 4), "dt": round(time.monotonic() - m0, 4), "st": status, "e": err})

        await asyncio.gather(*(one() for _ in range(spec["count"])))
    out.write_text(json.dumps({"bytes": len(body), "requests": results}))


def raise_fd_limit(wanted: int) -> tuple[int, int]:
    """Soft open-files limit up to `wanted` (at most the hard limit); returns (soft, hard) afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


async def run_slow(spec: dict, out: Path) -> None:
    """`count` connections that each send half a request line and stall for `hold_s`; then closed.

    Written to `out`: how many opened, how many could not (by error), how many the server had closed
    before the end (a header deadline at work), and this process's fd limit.
    """
    count, host, port = int(spec["count"]), spec["host"], int(spec["port"])
    soft, hard = raise_fd_limit(count + 64)
    count = min(count, soft - 64)
    partial = b"POST /classify HTT"
    writers: list = []
    failed: dict[str, int] = {}
    t0 = time.monotonic()

    async def open_one() -> None:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), spec.get("connect_s", 5.0))
            writer.write(partial)
            await writer.drain()
            writers.append((reader, writer))
        except Exception as e:  # noqa: BLE001
            failed[type(e).__name__] = failed.get(type(e).__name__, 0) + 1

    for i in range(0, count, 250):  # in bounded waves: the point is to hold them, not to flood the accept queue
        await asyncio.gather(*(open_one() for _ in range(min(250, count - i))))
    opened_s = time.monotonic() - t0
    print("started", flush=True)
    await asyncio.sleep(max(0.0, spec["hold_s"] - opened_s))
    closed_by_server = 0
    for reader, writer in writers:
        # The event loop has seen every close or reset during the hold: EOF or an exception on the reader.
        closed_by_server += reader.at_eof() or reader.exception() is not None
        writer.transport.abort()
    out.write_text(json.dumps({"requested": int(spec["count"]), "opened": len(writers), "failed": failed,
                               "open_s": round(opened_s, 2), "closed_by_server": closed_by_server,
                               "fd_limit": [soft, hard]}))


def main(argv: list[str]) -> int:
    mode, spec_path, out = argv[0], Path(argv[1]), Path(argv[2])
    spec = json.loads(spec_path.read_text())
    runner = {"load": run_load, "burst": run_burst, "slow": run_slow}[mode]
    asyncio.run(runner(spec, out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
