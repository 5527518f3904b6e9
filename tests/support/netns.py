"""Network namespaces that stand for hosts: each with its own address on one private link, made and
removed by the test that uses them (`ip netns`, as root).

The hosts hang off a bridge in a namespace of its own; this (the test's) namespace joins the bridge
too, with the link's first address, so the test reaches every host. The addresses come from
198.18.0.0/15, which RFC 2544 sets aside for benchmarking networks: nothing real answers there, and
traffic goes only to the addresses given here. Every name starts with a prefix unique to the process,
and `remove` (called on exit, whatever happened) deletes the namespaces and, with them, their links.
"""
from __future__ import annotations

import os
import shutil
import subprocess

SUBNET = "198.18.77"  # /24, RFC 2544's benchmarking range
TEST_ADDRESS = f"{SUBNET}.1"


def cannot_make_namespaces() -> str | None:
    """Why this machine cannot make network namespaces here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    probe = f"effp{os.getpid() % 100000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", "netns", "exec", ns, "ip", *args] if ns else ["ip", *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")


class Hosts:
    """`hosts = Hosts(["gw", "wa"])`: namespaces `<prefix>-gw`, ... with addresses `hosts.address["gw"]`."""

    def __init__(self, names: list[str]) -> None:
        self.prefix = f"efm{os.getpid() % 100000}"
        self.names = list(names)
        self.ns = {n: f"{self.prefix}-{n}" for n in names}
        self.address = {n: f"{SUBNET}.{10 + i}" for i, n in enumerate(names)}
        self.bridge_ns = f"{self.prefix}-br"
        self.made: list[str] = []

    def make(self) -> "Hosts":
        try:
            for ns in [self.bridge_ns, *self.ns.values()]:
                _ip("netns", "add", ns)
                self.made.append(ns)
                _ip("link", "set", "lo", "up", ns=ns)
            _ip("link", "add", "br0", "type", "bridge", ns=self.bridge_ns)
            _ip("link", "set", "br0", "up", ns=self.bridge_ns)
            # this namespace's leg: the test reaches the hosts through it
            self._link(f"{self.prefix}-t", None, TEST_ADDRESS)
            for i, n in enumerate(self.names):
                self._link(f"{self.prefix}-{i}", self.ns[n], self.address[n])
        except Exception:
            self.remove()
            raise
        return self

    def _link(self, name: str, ns: str | None, address: str) -> None:
        """A veth pair: one end in `ns` (None: here) with `address`, the other on the bridge."""
        peer = f"{name}b"
        _ip("link", "add", name, "type", "veth", "peer", "name", peer)
        try:
            _ip("link", "set", peer, "netns", self.bridge_ns)
            if ns is not None:
                _ip("link", "set", name, "netns", ns)
        except Exception:
            subprocess.run(["ip", "link", "del", name], capture_output=True)
            raise
        _ip("link", "set", peer, "master", "br0", ns=self.bridge_ns)
        _ip("link", "set", peer, "up", ns=self.bridge_ns)
        _ip("addr", "add", f"{address}/24", "dev", name, ns=ns)
        _ip("link", "set", name, "up", ns=ns)

    def command(self, host: str, cmd: list[str]) -> list[str]:
        """`cmd` run on `host` (inside its namespace)."""
        return ["ip", "netns", "exec", self.ns[host], *cmd]

    def remove(self) -> None:
        # Deleting a namespace deletes the veth ends in it, and so their peers; this namespace's own leg
        # goes with its peer on the bridge.
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", f"{self.prefix}-t"], capture_output=True)
        self.made.clear()

    def __enter__(self) -> "Hosts":
        return self.make()

    def __exit__(self, *exc: object) -> None:
        self.remove()
