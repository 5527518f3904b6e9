"""Graceful drain on SIGTERM: stop admitting, finish what was admitted, then stop, within a grace period.

BentoML's arbiter (circus) answers SIGTERM by sending SIGTERM to every process of the server at once,
and each one's uvicorn then stops accepting at once. Left alone, that fails the requests in flight:
the workers stop under the gateway's queued calls (502), and while the arbiter still holds the
listening socket, new connections wait in its backlog for nobody (timeouts, then resets). So each
process's signal handler is wrapped here (`DrainMiddleware`, installed on every service by
`service/app.py`):

- the **gateway** turns draining at once: `/readyz` answers 503, new requests 503 + Retry-After and
  `Connection: close`, while the requests admitted before the signal run on; once none is left (or
  `server.drain_grace_s` has passed) it closes the listening socket for every process that shares it,
  when the workers stop too (later connections are refused, not left waiting; a gateway stopped alone
  leaves the socket to the one the arbiter starts next), and hands the signal to uvicorn, which stops;
- a **worker** keeps serving until the gateway has drained (or gone), so that the gateway's admitted
  requests still have somewhere to run, and its own calls in flight have finished; then it stops.

Every request that passes here ends with an answer sent, even one whose client left (499, which
uvicorn drops: the connection is gone) or whose handler returned or failed without answering (500, as
uvicorn would send it). BentoML's `TimeoutMiddleware`, outside this one, waits for a request's first
message sent, not for its handler to end: a request that ends without one holds it until
`server.timeout_s`, and uvicorn's shutdown waits for every such request, so the process outlived its
drain until the watchdog below ended it.

The gateway tells its workers through a small file in the server's runtime folder (`$TMPDIR`, private
to the server, service.app), named by the arbiter's pid, which every process of one server shares.
A second SIGINT (Ctrl-C twice) stops at once.
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from .errors import error_response, request_id

logger = logging.getLogger("effnet.drain")

SIGNALS = (signal.SIGTERM, signal.SIGINT)
PROBES = ("/livez", "/healthz", "/metrics")  # answered while draining, and not counted as admitted work
READY_PATHS = ("/readyz",)
WORKER_MARGIN_S = 2.0  # a worker outlives the gateway's grace by this much, so the gateway ends first
FORCE_AFTER_S = 5.0  # after handing the signal on, a process still alive this much later is ended
POLL_S = 0.05
GATEWAY_SIGNAL_S = 1.0  # the arbiter signals its processes one after another: the gateway's may come later
MAX_REFUSED_BODY = 64 * 1024 * 1024  # read at most this much of a refused request's body (see _refuse)


def gateway_file(runtime_dir: str | os.PathLike | None = None, arbiter_pid: int | None = None) -> Path:
    """Where the gateway of this server says it runs or drains; absent once it has drained."""
    folder = Path(runtime_dir or tempfile.gettempdir())
    return folder / f"effnet-gateway-{arbiter_pid or os.getppid()}.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def gateway_state(path: Path) -> str | None:
    """"serving" or "draining" while the gateway process lives; None once it has drained, died or never started."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not _alive(int(data.get("pid", 0) or 0)):
        return None
    return data.get("state")


def worker_marks(gateway: Path) -> list[Path]:
    """The marks of this server's workers that are draining now (see `Drain.begin`)."""
    return [p for p in gateway.parent.glob(gateway.name.replace("effnet-gateway-", "effnet-worker-").replace(
        ".json", "-*.draining")) if _alive(int(p.stem.rsplit("-", 1)[-1] or 0))]


def _write_state(path: Path, state: str) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "state": state}))
    os.replace(tmp, path)


def listening_fd(argv: list[str] | None = None) -> int | None:
    """The listening socket BentoML handed this process (`--fd N` on its command line), or None."""
    argv = sys.argv if argv is None else argv
    for i, arg in enumerate(argv[:-1]):
        if arg == "--fd":
            try:
                return int(argv[i + 1])
            except ValueError:
                return None
    return None


def stop_listening(fd: int | None) -> None:
    """Close the listening socket for every process that shares it (the arbiter keeps a copy open, so a
    close here alone would leave new connections queued with nobody to accept them)."""
    if fd is None:
        return
    try:
        s = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        s.close()


class Drain:
    """One process's drain: its state, its requests in flight, and what it does on the signal.

    `role` is "gateway" (refuses new work while draining and tells the workers when it is done) or
    "worker" (serves on until the gateway is done). `hand_on(sig)` is the handler the server had before
    (uvicorn's), called once draining is over.
    """

    def __init__(self, role: str, grace_s: float, retry_after_s: int, runtime_dir: str | None = None,
                 hand_on: Callable[[int, Any], Any] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.role = role
        self.grace_s = grace_s
        self.retry_after_s = retry_after_s
        self.file = gateway_file(runtime_dir)
        self.hand_on = hand_on
        self.clock = clock
        self.inflight = 0
        self.since: float | None = None  # when the signal came (clock), None while serving
        self.done = False

    @property
    def draining(self) -> bool:
        return self.since is not None

    def deadline(self) -> float:
        assert self.since is not None
        return self.since + self.grace_s + (WORKER_MARGIN_S if self.role == "worker" else 0.0)

    def begin(self) -> bool:
        """Start draining; False if it had already begun."""
        if self.since is not None:
            return False
        self.since = self.clock()
        if self.role == "gateway":
            try:
                _write_state(self.file, "draining")
            except OSError as e:  # the workers then wait for this process to end instead
                logger.error("cannot write %s: %s", self.file, e)
        else:  # says the whole server stops, not the gateway alone (see end)
            with contextlib.suppress(OSError):
                self.mark().touch()
        logger.warning("%s %d: draining (%d request(s) in flight); stopping within %.0f s", self.role, os.getpid(),
                       self.inflight, self.deadline() - self.since)
        return True

    def finished(self) -> bool:
        """Whether this process may stop now."""
        if self.clock() >= self.deadline():
            return True
        if self.inflight:
            return False
        if self.role == "gateway":
            return True
        # A worker waits while the gateway drains; a gateway that still serves after the first second got
        # no signal (this worker alone is being stopped), and then the worker's own calls are all it waits for.
        state = gateway_state(self.file)
        return state is None or (state == "serving" and self.clock() - (self.since or 0) >= GATEWAY_SIGNAL_S)

    async def wait(self) -> None:
        while not self.finished():
            await asyncio.sleep(POLL_S)

    def end(self) -> None:
        """Drained: say so, and (the gateway) stop listening for every process."""
        self.done = True
        late = self.inflight
        if self.role == "gateway":
            # The listening socket is shared with the arbiter, and a gateway restarted alone (a SIGTERM to it
            # only) inherits it: it is closed for everyone only when the workers stop too.
            if worker_marks(self.file):
                stop_listening(listening_fd())
            with contextlib.suppress(OSError):
                self.file.unlink(missing_ok=True)
        else:
            with contextlib.suppress(OSError):
                self.mark().unlink(missing_ok=True)
        logger.warning("%s %d: drained in %.1f s%s; stopping", self.role, os.getpid(), self.clock() - (self.since or 0),
                       f", {late} request(s) still running at the end of the grace period" if late else "")

    def mark(self) -> Path:
        return self.file.with_name(self.file.name.replace("effnet-gateway-", "effnet-worker-").replace(
            ".json", f"-{os.getpid()}.draining"))

    def started(self) -> None:
        """The gateway says it serves (its workers then wait for it on a signal)."""
        if self.role == "gateway":
            try:
                _write_state(self.file, "serving")
            except OSError as e:
                logger.error("cannot write %s: %s; workers will not wait for this gateway to drain", self.file, e)


def _die_with_parent() -> None:
    """SIGTERM this process (and so drain it) when the arbiter that started it dies, even by SIGKILL: BentoML
    starts each process in a session of its own, where a signal to the arbiter's group does not reach it,
    and an orphaned worker would hold its cores and memory for good."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        pass


def install(drain: Drain, loop: asyncio.AbstractEventLoop) -> bool:
    """Wrap this process's SIGTERM and SIGINT handlers (uvicorn's, installed before the app starts) so that
    the first signal drains and then hands on. Only in the main thread (where signals are handled)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    _die_with_parent()
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}

    def hand_on(sig: int) -> None:
        handler = previous.get(sig)
        if callable(handler):
            handler(sig, None)
        elif handler == signal.SIG_DFL:
            signal.raise_signal(sig)

    def on_signal(sig: int, frame: Any) -> None:
        if drain.done or (drain.draining and sig == signal.SIGINT):  # stopping already, or Ctrl-C twice
            hand_on(sig)
            return
        # The handler runs in whatever request's context the main thread was in: the drain is nobody's
        # request (service/request_log.py), so its log lines and task start from an empty context.
        if contextvars.Context().run(drain.begin):
            # A watchdog apart from the event loop: a loop blocked (a worker still loading its engine)
            # never runs the drain, and the process must end within its grace all the same.
            watchdog = threading.Timer(drain.deadline() - drain.clock() + FORCE_AFTER_S, _force_exit)
            watchdog.daemon = True
            watchdog.start()
            loop.call_soon_threadsafe(lambda: loop.create_task(_finish(drain, lambda: hand_on(sig))),
                                      context=contextvars.Context())

    for sig in SIGNALS:
        signal.signal(sig, on_signal)
    return True


async def _finish(drain: Drain, hand_on: Callable[[], None]) -> None:
    await drain.wait()
    drain.end()
    # uvicorn now waits for open connections; one that never closes (a client that stopped mid-request)
    # is ended by the watchdog that the signal started.
    hand_on()


def _force_exit() -> None:
    logger.error("process %d still running %.0f s after its grace period; ending it", os.getpid(), FORCE_AFTER_S)
    logging.shutdown()
    os._exit(1)


class DrainMiddleware:
    """Counts each request in flight, and while draining (gateway) answers new ones 503.

    On the lifespan's start (in the main thread, after uvicorn has installed its signal handlers) it
    wraps them (`install`)."""

    def __init__(self, app: Any, role: str, grace_s: float, retry_after_s: int) -> None:
        self.app = app
        self.drain = Drain(role, grace_s, retry_after_s)
        self.installed = False

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            if not self.installed:
                self.installed = install(self.drain, asyncio.get_running_loop())
            return await self.app(scope, receive, self._lifespan_send(send))
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        answer = Answer(receive, send)
        try:
            await self._http(scope, answer.receive, answer.send)
        except Exception:
            await answer.ensure_sent(scope)
            raise
        await answer.ensure_sent(scope)

    async def _http(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        d = self.drain
        if d.draining and d.role == "gateway":
            if path in READY_PATHS:
                return await error_response(request_id(), 503, "draining: this server is shutting down",
                                            {"Connection": "close"})(scope, receive, send)
            if path not in PROBES:
                return await self._refuse(scope, receive, send)
        if path in PROBES or path in READY_PATHS:
            return await self.app(scope, receive, send)
        d.inflight += 1
        try:
            await self.app(scope, receive, self._closing_send(send))
        finally:
            d.inflight -= 1

    def _lifespan_send(self, send: Any) -> Any:
        async def wrapped(message: dict) -> None:
            if message.get("type") == "lifespan.startup.complete":
                self.drain.started()
            await send(message)
        return wrapped

    def _closing_send(self, send: Any) -> Any:
        """While draining, the gateway's answers close their connection, so that clients reconnect elsewhere."""
        async def wrapped(message: dict) -> None:
            if message.get("type") == "http.response.start" and self.drain.draining and self.drain.role == "gateway":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": headers + [(b"connection", b"close")]}
            await send(message)
        return wrapped

    async def _refuse(self, scope: dict, receive: Any, send: Any) -> None:
        """503 + Retry-After to a request that came after the signal. Its body is read first (up to a
        bound, briefly): a connection closed with unread data is reset, and the client would see the
        reset instead of the answer."""
        try:
            async with asyncio.timeout(1.0):
                read = 0
                while read <= MAX_REFUSED_BODY:
                    message = await receive()
                    read += len(message.get("body", b""))
                    if message["type"] != "http.request" or not message.get("more_body"):
                        break
        except TimeoutError:
            pass
        await error_response(request_id(), 503, "this server is shutting down (draining); retry on another "
                             f"instance, or here after {self.drain.retry_after_s} s once it has restarted",
                             {"Retry-After": str(self.drain.retry_after_s), "Connection": "close"})(scope, receive, send)


class Answer:
    """One request's `receive` and `send`, watched: whether an answer has started, and whether the client
    is known to have left."""

    def __init__(self, receive: Any, send: Any) -> None:
        self._receive, self._send = receive, send
        self.started = False
        self.gone = False

    async def receive(self) -> dict:
        message = await self._receive()
        if message.get("type") == "http.disconnect":
            self.gone = True
        return message

    async def send(self, message: dict) -> None:
        if message.get("type") == "http.response.start":
            self.started = True
        await self._send(message)

    async def ensure_sent(self, scope: dict) -> None:
        """Answer a request that ended without one (see the module's docstring)."""
        if self.started:
            return
        if self.gone:
            status, message = 499, "the client closed its connection before the answer"
        else:
            status, message = 500, "the request ended without an answer"
        await error_response(request_id(), status, message, {"Connection": "close"})(scope, self.receive, self.send)
