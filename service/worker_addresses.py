"""Where a variant's workers are when the gateway does not start them: `workers_at`.

A variant's `workers_at` is either a list of URLs (`["http://10.0.0.2:3001", ...]`, each one replica),
or one `dns://NAME:PORT` re-resolved every `resolve_every_s`, each address it resolves to a replica (a
Kubernetes headless Service gives one per ready pod). Replicas are then seen one by one, as the
gateway's own workers are: each is chosen, checked and marked down on its own (service/health.py),
which one load-balanced address would hide. The workers there are `effnet worker VARIANT`
(service/worker_app.py).
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from .config_checks import ConfigError

DNS_SCHEME = "dns"
RESOLVE_EVERY_S = 10.0  # how often a dns:// name is resolved again, unless a variant says otherwise


@dataclass(frozen=True)
class Addresses:
    """A variant's `workers_at`: fixed `urls`, or a `name` and `port` to resolve."""
    urls: tuple[str, ...] = ()
    name: str = ""
    port: int = 0

    @property
    def dynamic(self) -> bool:
        return bool(self.name)

    def describe(self) -> str:
        return f"dns://{self.name}:{self.port}" if self.dynamic else ", ".join(self.urls)


def _url(where: str, url: object) -> str:
    if not isinstance(url, str):
        raise ConfigError(f"{where}: expected a URL such as 'http://10.0.0.2:3000', got {url!r}")
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None or parts.path not in ("", "/"):
        raise ConfigError(f"{where}: expected http://HOST:PORT (or https://), got {url!r}")
    return f"{parts.scheme}://{parts.netloc}"


def parse_workers_at(where: str, value: object) -> tuple[str, ...]:
    """`workers_at` as written, checked: a tuple of URLs, or one dns:// URL."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: expected a list of worker URLs or one 'dns://NAME:PORT'")
    if any(isinstance(u, str) and u.startswith(f"{DNS_SCHEME}://") for u in value):
        if len(value) != 1:
            raise ConfigError(f"{where}: a dns:// name stands alone (every address it resolves to is a replica)")
        addresses(value[0], where)
        return (value[0],)
    urls = tuple(_url(f"{where}[{i}]", u) for i, u in enumerate(value))
    if len(set(urls)) != len(urls):
        raise ConfigError(f"{where}: a URL is listed twice")
    return urls


def addresses(workers_at: tuple[str, ...] | str, where: str = "workers_at") -> Addresses:
    """The parsed form of a (checked) `workers_at`."""
    items = (workers_at,) if isinstance(workers_at, str) else tuple(workers_at)
    if len(items) == 1 and items[0].startswith(f"{DNS_SCHEME}://"):
        parts = urlsplit(items[0])
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or port is None or parts.path not in ("", "/"):
            raise ConfigError(f"{where}: expected dns://NAME:PORT, got {items[0]!r}")
        return Addresses(name=parts.hostname, port=port)
    return Addresses(urls=items)


def url_for(ip: str, port: int) -> str:
    host = f"[{ip}]" if ipaddress.ip_address(ip).version == 6 else ip
    return f"http://{host}:{port}"


async def resolve(a: Addresses) -> list[str]:
    """The replicas' URLs now: the fixed list, or one per address the name resolves to (sorted, so that the
    order is stable between resolutions). Raises OSError when the name does not resolve."""
    if not a.dynamic:
        return list(a.urls)
    infos = await asyncio.get_running_loop().getaddrinfo(a.name, a.port, type=socket.SOCK_STREAM)
    ips = sorted({info[4][0] for info in infos}, key=lambda ip: (ipaddress.ip_address(ip).version,
                                                                 ipaddress.ip_address(ip)))
    return [url_for(ip, a.port) for ip in ips]
