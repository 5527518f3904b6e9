"""Live route changes (`PATCH /routes/NAME`): who may make them, their checks, and their persistence.

A change is checked as the configuration file is, plus what only a running server knows: every
variant of the route must be loaded and share the route's classes, and no served variant may be left
in no route. With `server.route_changes: persist` (the default) it is saved before it takes effect
(service/route_state.py) and served again after a restart, while the file's own entry for that route
stays as it was; with `memory`, a restart serves the configuration file's routes.
"""
from __future__ import annotations

import hmac
import logging
import os
import time
from dataclasses import replace
from typing import Any, Callable

from . import metrics, route_state
from .audit import ADMIN_HOSTS_ENV, ADMIN_TOKEN_ENV
from .config import ConfigError, RouteConfig, ServingConfig, check_label_spaces, parse_route, unrouted
from .errors import ClientError
from .routing import shown

logger = logging.getLogger("effnet.gateway")

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
MAX_CHANGE_BYTES = 64 * 1024


def host_name(header: str | None) -> str:
    """The host of a Host header, without its port or IPv6 brackets, lower-case."""
    h = (header or "").strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def own_hosts(local_address: str | None) -> set[str]:
    """The names this server answers admin requests under: loopback, this machine's names, the address
    the request came in on, and `$EFFNET_ADMIN_HOSTS` (a proxy's public name)."""
    import socket

    names = {*LOOPBACK_NAMES, socket.gethostname().lower(), socket.getfqdn().lower()}
    if local_address:
        names.add(local_address.lower())
    names.update(n.strip().lower() for n in os.environ.get(ADMIN_HOSTS_ENV, "").split(",") if n.strip())
    return names


def admin_refusal(host_header: str | None, local_address: str | None, authorization: str | None,
                  token: str | None) -> tuple[int, str] | None:
    """Who may change routes: whoever sends the configured token (service.audit: `$EFFNET_ADMIN_TOKEN`
    or the state folder's token file), with a Host header that names this server. With no token
    configured, nobody: a process on this machine, an SSH tunnel or a proxy that forwards no headers
    is not proof of an operator. The Host check stops DNS rebinding (a web page whose name resolves to
    127.0.0.1, sending the browser's requests here with its own name as Host)."""
    host = host_name(host_header)
    if host not in own_hosts(local_address):
        return 403, (f"the Host header {host!r} is not a name of this server; send a name or address of it, or "
                     f"list the name in ${ADMIN_HOSTS_ENV} on the server")
    if not token:
        return 403, (f"route changes are closed: the server has no admin token; set ${ADMIN_TOKEN_ENV} on the "
                     "server, or start it with `effnet serve`, which makes a token file and names it")
    given = (authorization or "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(given.encode(), token.encode()):
        return 401, (f"send the header 'Authorization: Bearer <token>' with the server's ${ADMIN_TOKEN_ENV} or the "
                     "token in the file that `effnet serve` names at start")
    return None


def with_route(cfg: ServingConfig, name: str, raw: Any, classes: dict[str, list[str]]) -> tuple[RouteConfig, ServingConfig]:
    """`cfg` with route `name` replaced by `raw` ({"split", "shadow"}), checked as the configuration
    file is; raises ConfigError."""
    route = parse_route(name, raw, cfg.variants, where=name)
    routes = {**cfg.routes, name: route}
    left = unrouted(cfg.variants, routes)
    if left:
        raise ConfigError(f"variant(s) {left} would be in no route; keep them in a split or a shadow")
    new = replace(cfg, routes=routes)
    check_label_spaces(new, classes)
    return route, new


def publish_splits(cfg: ServingConfig, routes) -> None:
    """`effnet_split_weight` of every variant in each of `routes`."""
    for r in routes:
        for v in cfg.variants:
            metrics.SPLIT_WEIGHT.labels(r.name, v).set(r.split.get(v, 0.0))


class LiveRoutes:
    """The configuration file's routes, the live changes made on top of them, and where they are saved."""

    def __init__(self, cfg: ServingConfig) -> None:
        self.file_routes: dict[str, RouteConfig] = dict(cfg.routes)  # as the configuration file has them
        self.changed_at: dict[str, str] = {}  # route -> when a live change made it differ from the file
        self.saved: dict[str, dict] = {}  # what the file of saved changes holds now
        persist = cfg.server.route_changes == "persist" and os.path.isfile(cfg.source)
        self.file = route_state.state_path(cfg.source) if persist else None

    def restore(self, cfg: ServingConfig, classes: dict[str, list[str]]) -> ServingConfig:
        """`cfg` with the changes saved before the last restart, where the file has not been edited since."""
        if not self.file:
            return cfg
        saved, kept = route_state.load(self.file), {}
        for name, entry in saved.items():
            when = entry.get("changed_at", "?")
            if name not in self.file_routes:
                logger.warning("route %s: the change saved at %s is dropped: the configuration has no such route "
                               "any more", name, when)
                continue
            if not route_state.same_route(entry["base"], route_state.route_dict(self.file_routes[name])):
                logger.warning("route %s: the change saved at %s is dropped: the route has been edited in %s since, "
                               "and the file wins", name, when, cfg.source)
                continue
            try:
                route, cfg = with_route(cfg, name, entry["route"], classes)
            except (ConfigError, TypeError, ValueError, AttributeError) as e:  # also a hand-edited file
                logger.warning("route %s: the change saved at %s is dropped: %s", name, when, e)
                continue
            kept[name], self.changed_at[name] = entry, when
            logger.warning("route %s: serving the change made at %s (split %s, shadow %s), saved in %s, instead of "
                           "the file's; `effnet serve --reset-routes` serves the file's", name, when, route.split,
                           route.shadow, self.file)
        if kept != saved:
            try:
                route_state.save(self.file, kept, cfg.source)
            except OSError as e:
                logger.error("cannot rewrite %s: %s", self.file, e)
        self.saved = kept
        return cfg

    def change(self, cfg: ServingConfig, name: str, change: Any, classes: dict[str, list[str]],
               problem: Callable[[str], str | None]) -> tuple[RouteConfig, ServingConfig]:
        """Apply {"split": ..., "shadow": ...} (either or both; "shadow": null removes it) to route `name`:
        the route as changed and the configuration to serve. Raises ClientError (404 for an unknown
        route, 500 when it cannot be saved, else 400) and changes nothing then. `problem(variant)`
        says why a variant is not ready to answer."""
        if name not in cfg.routes:
            raise ClientError(f"unknown route {shown(name)}; routes: {', '.join(cfg.routes)}", 404)
        if not isinstance(change, dict) or not change or set(change) - {"split", "shadow"}:
            raise ClientError('send a JSON object with "split" (variant -> weight) and/or "shadow" '
                              '({"variant": ..., "fraction": ...} or null), e.g. {"split": {"b0": 0.9, "mec": 0.1}}')
        old = cfg.routes[name]
        # the change over the route as it is: fallback, control and policy are kept (the file sets them)
        raw = {**route_state.route_dict(old), **change}
        try:
            route, new = with_route(cfg, name, raw, classes)
        except ConfigError as e:
            raise ClientError(f"route not changed: {e}") from None
        for v in route.variants:
            if (why := problem(v)) is not None:
                raise ClientError(f"route not changed: variant {v!r} is not ready: {why}")
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        as_in_file = route_state.same_route(route_state.route_dict(route),
                                            route_state.route_dict(self.file_routes[name]))
        self._save(name, route, when, as_in_file, cfg.source)
        if as_in_file:
            self.changed_at.pop(name, None)
        else:
            self.changed_at[name] = when
        publish_splits(new, [route])
        metrics.ROUTE_CHANGES.labels(name).inc()
        logger.warning("route %s changed: split %s -> %s, shadow %s -> %s (%s)", name, old.split, route.split,
                       old.shadow, route.shadow, f"saved in {self.file}" if self.file
                       else "until the next restart: server.route_changes is memory")
        return route, new

    def _save(self, name: str, route: RouteConfig, when: str, as_in_file: bool, source: str) -> None:
        """Record the change before it takes effect; a change that restores the file's route is forgotten."""
        if not self.file:
            return
        entries = dict(self.saved)
        if as_in_file:
            entries.pop(name, None)
        else:
            entries[name] = {"base": route_state.route_dict(self.file_routes[name]),
                             "route": route_state.route_dict(route), "changed_at": when}
        try:
            route_state.save(self.file, entries, source)
        except OSError as e:
            raise ClientError(f"route not changed: the change could not be saved to {self.file} ({e}); "
                              "fix that, or set server.route_changes: memory", 500) from None
        self.saved = entries
