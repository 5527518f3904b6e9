"""Connection-phase limits of the gateway's HTTP server, below ASGI: header deadline, idle keep-alive, cap.

uvicorn (which `bentoml serve` runs) has no deadline for a request's headers: a client that opens a
connection and sends half a request line holds a file descriptor until it leaves, and thousands of
them exhaust the process's descriptors, after which the gateway cannot even reach its workers. An ASGI
middleware cannot help (it runs only once the headers are complete), so the limits live in the HTTP
protocol object that uvicorn makes per connection:
- `header_timeout_s`: from the connection's start (or the first byte of its next request) to its
  complete headers; past it the client gets 408 and the connection is closed (nginx's
  client_header_timeout);
- `keepalive_timeout_s`: uvicorn's own `timeout_keep_alive`, the idle time between requests;
- `max_connections`: a new connection above it closes the connection that has waited longest for
  headers or idled longest (nginx reuses idle keep-alive connections this way); if every connection is
  busy with a request, the new one gets 503 with Retry-After and is closed. Slow clients therefore
  cannot lock out fast ones, and the descriptors in use stay bounded. uvicorn's own
  `limit_concurrency` is not used: it answers 503 without Retry-After, only once the headers are in
  (so slow connections still pile up), and counts requests, not descriptors.

BentoML 1.4 builds its `uvicorn.Config` itself (`_bentoml_impl/worker/service.py`) with no way to pass
`http=` or these timeouts from the service, so `install` wraps `uvicorn.Config.load`: in the entry
service's process (the gateway) the protocol class it loads is replaced by a subclass with the limits
above, and the keep-alive timeout is set. Worker processes, reached only by the gateway, are unchanged.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import resource
from typing import Any

log = logging.getLogger(__name__)

# File descriptors kept for everything but client connections: worker sockets, shared memory, logs.
RESERVED_FDS = 256
# A connection refused above the cap is read (and dropped) this long after its 503 before it is closed:
# closing with its request unread would reset it, and the client would never see the 503.
REFUSED_LINGER_S = 1.0


def _plain_answer(status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 answer with our JSON error body, written to a connection with no request cycle."""
    body = json.dumps({"error": message}).encode()
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", f"content-length: {len(body)}",
            "connection: close", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class ConnectionLimits:
    """The limits shared by every connection of one server, and the connections waiting for a request.

    `waiting` holds, oldest first, the connections that have no request in progress: those still
    receiving headers and idle keep-alive ones. They are the ones a new connection may push out.
    """

    def __init__(self, header_timeout_s: float, max_connections: int, retry_after_s: int = 1) -> None:
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        self.retry_after_s = retry_after_s
        self.waiting: collections.OrderedDict[Any, None] = collections.OrderedDict()
        self.timed_out = 0  # counters, for tests and logs
        self.pushed_out = 0
        self.refused = 0


class LimitedConnection:
    """Mixed into uvicorn's HttpToolsProtocol or H11Protocol (`limited_protocol`)."""

    limits: ConnectionLimits  # set on the subclass
    _header_timer: asyncio.TimerHandle | None = None
    _refused = False

    # -- waiting for a request (headers not complete, or idle) ------------------------------------
    def _start_waiting(self, headers: bool) -> None:
        self.limits.waiting[self] = None
        self.limits.waiting.move_to_end(self)
        if headers and self._header_timer is None:
            self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._headers_too_slow)

    def _stop_waiting(self) -> None:
        self.limits.waiting.pop(self, None)
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _request_in_progress(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        self.limits.timed_out += 1
        if not self._request_in_progress():  # else a pipelined request is being answered: just close
            self.transport.write(_plain_answer(
                408, "Request Timeout", f"the request headers did not arrive within {self.limits.header_timeout_s:g} s"))
        self.transport.close()

    # -- uvicorn's protocol interface ------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections and not self._push_out_one():
            self.limits.refused += 1
            self._refused = True
            transport.write(_plain_answer(503, "Service Unavailable", "too many connections; retry later",
                                          {"retry-after": str(self.limits.retry_after_s)}))
            if transport.can_write_eof():
                transport.write_eof()
            self.loop.call_later(REFUSED_LINGER_S, transport.close)
            return
        self._start_waiting(headers=True)

    def data_received(self, data: bytes) -> None:
        if not self._refused:  # a refused connection's request is only drained
            super().data_received(data)

    def _push_out_one(self) -> bool:
        """Close the connection that has waited longest for a request; False if none is waiting."""
        for other in self.limits.waiting:
            if other is not self:
                self.limits.pushed_out += 1
                other._stop_waiting()
                other.transport.close()
                return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self._request_in_progress():
            self._start_waiting(headers=False)  # idle: uvicorn's keep-alive timer runs


class LimitedHttpTools(LimitedConnection):
    def on_message_begin(self) -> None:  # the first byte of a request: its headers' deadline starts
        super().on_message_begin()
        self._start_waiting(headers=True)

    def on_headers_complete(self) -> None:
        self._stop_waiting()
        super().on_headers_complete()


class LimitedH11(LimitedConnection):
    def handle_events(self) -> None:
        import h11

        super().handle_events()
        if self.transport.is_closing():
            return
        if self.conn.their_state is not h11.IDLE:
            self._stop_waiting()  # the request's headers are in
        elif self.conn.trailing_data[0]:
            self._start_waiting(headers=True)  # part of the next request's headers


def limited_protocol(protocol_class: type, limits: ConnectionLimits) -> type:
    """`protocol_class` (uvicorn's httptools or h11 protocol) with the header deadline and connection cap."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    mixin = LimitedHttpTools if issubclass(protocol_class, HttpToolsProtocol) else LimitedH11
    return type(f"Limited{protocol_class.__name__}", (mixin, protocol_class), {"limits": limits})


def _is_gateway() -> bool:
    from bentoml._internal.context import server_context

    return server_context.service_type == "entry_service"


def _raise_fd_limit(needed: int) -> None:
    """Raise the soft open-files limit to `needed` where the hard limit allows; warn where it does not."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        new = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < needed:
            log.warning("server.max_connections: %d connections need %d file descriptors, the limit is %d",
                        needed - RESERVED_FDS, needed, new)


_installed: dict[str, Any] = {}


def install(server: Any) -> None:
    """Apply `server`'s header_timeout_s, keepalive_timeout_s and max_connections to the gateway's uvicorn."""
    import uvicorn.config

    _installed["server"] = server
    if "load" in _installed:
        return
    original = _installed["load"] = uvicorn.config.Config.load

    def load(config: Any) -> None:
        original(config)
        if not _is_gateway():
            return
        s = _installed["server"]
        limits = ConnectionLimits(s.header_timeout_s, s.max_connections, s.retry_after_s)
        config.http_protocol_class = limited_protocol(config.http_protocol_class, limits)
        config.timeout_keep_alive = s.keepalive_timeout_s
        _raise_fd_limit(s.max_connections + RESERVED_FDS)

    uvicorn.config.Config.load = load
