"""Client API keys: the keys file, its hashes, and reading it again when it changes.

The file (`server.api_keys`, else `$EFFNET_API_KEYS_FILE`; a mounted Kubernetes secret is a file) is YAML,
one key a line:

    alice: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
    batch-jobs: {sha256: 60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752, requests_per_s: 20, concurrent: 4}

Only the sha256 of each key is stored, so the file (and a copy of it) never gives a key away; a key is
random (`effnet keys add`), so one unsalted sha256 is enough. The presented key's hash is compared with
every stored hash in constant time, so the answer's timing says nothing about how close a guess was.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from store.durable import write_atomic

from .config_checks import ConfigError, check_keys, check_number

log = logging.getLogger("effnet.keys")

KEYS_FILE_ENV = "EFFNET_API_KEYS_FILE"
_HEX = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # a metrics label value and a log field: nothing to escape


@dataclass(frozen=True)
class ClientKey:
    """One key of the file: its name (in metrics and logs), its sha256 and its own quota (None: the default)."""

    name: str
    digest: bytes
    requests_per_s: float | None = None
    concurrent: int | None = None


def hash_key(key: str) -> str:
    """The hex sha256 of a key, as the keys file holds it."""
    return hashlib.sha256(key.encode()).hexdigest()


def keys_file(configured: str, config_source: str = "") -> Path | None:
    """The keys file: `server.api_keys` (a relative path is beside the configuration file), else
    `$EFFNET_API_KEYS_FILE`; None when neither is set (keys off)."""
    if configured:
        path = Path(configured).expanduser()
        return path if path.is_absolute() or not config_source else Path(config_source).parent / path
    env = os.environ.get(KEYS_FILE_ENV, "").strip()
    return Path(env) if env else None


def parse_keys(text: str, source: str) -> dict[str, ClientKey]:
    """The keys file's text -> name -> ClientKey; raises ConfigError naming the line's key."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"keys file {source} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"keys file {source}: expected `name: sha256-hex` lines, got {type(data).__name__}")
    keys, seen = {}, set()
    for name, entry in data.items():
        where = f"keys file {source}: {name}"
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigError(f"keys file {source}: key names are 1-64 letters, digits, '-', '_' or '.', got {name!r}")
        if not isinstance(entry, dict):
            entry = {"sha256": entry}
        entry = check_keys(where, entry, {"sha256", "requests_per_s", "concurrent"}, {"sha256"})
        digest = entry["sha256"]
        if not isinstance(digest, str) or not _HEX.fullmatch(digest.lower()):
            raise ConfigError(f"{where}: expected the key's sha256 as 64 hex digits (quoted if they are all "
                              "digits), never the key itself; `effnet keys add NAME` writes the line")
        if digest.lower() in seen:
            raise ConfigError(f"{where}: the same key is listed under another name; each key has one name")
        seen.add(digest.lower())
        rate = entry.get("requests_per_s")
        concurrent = entry.get("concurrent")
        keys[name] = ClientKey(
            name, bytes.fromhex(digest),
            None if rate is None else float(check_number(f"{where}.requests_per_s", rate)),
            None if concurrent is None else check_number(f"{where}.concurrent", concurrent, integer=True))
    return keys


def read_keys(path: Path) -> dict[str, ClientKey]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"keys file {path} cannot be read: {e}") from None
    return parse_keys(text, str(path))


class KeyRing:
    """The keys of a file, read again when the file changes.

    The file is looked at (one stat) at most every `poll_s`, from the request path: no thread, and a cost
    bounded however busy the server is. A Kubernetes secret update swaps a symlink, which changes the
    inode and mtime that the stat sees. A file that breaks while serving keeps the keys last read (with an
    error in the log): a half-written file must not lock every client out. A broken file at start is an
    error (ConfigError), as a typo in the configuration is.
    """

    def __init__(self, path: Path, poll_s: float = 1.0, clock: Any = time.monotonic) -> None:
        self.path, self.poll_s, self.clock = Path(path), poll_s, clock
        self.stamp = self._stamp()
        self.keys = read_keys(self.path)
        self.checked = clock()

    def _stamp(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def current(self) -> dict[str, ClientKey]:
        """The keys now: the file read again if it changed since it was last looked at."""
        now = self.clock()
        if now - self.checked >= self.poll_s:
            self.checked = now
            stamp = self._stamp()
            if stamp != self.stamp:
                self.stamp = stamp
                try:
                    self.keys = read_keys(self.path)
                    log.info("keys file %s read again: %d keys", self.path, len(self.keys))
                except ConfigError as e:
                    log.error("%s; serving on with the %d keys read before", e, len(self.keys))
        return self.keys

    def find(self, presented: str | None) -> ClientKey | None:
        """The key whose hash is the presented key's; every stored hash is compared, in constant time."""
        if not presented:
            return None
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for key in self.current().values():
            if hmac.compare_digest(key.digest, digest):
                found = key
        return found


def presented_key(headers: dict[bytes, bytes]) -> str | None:
    """The client's key: `X-Api-Key`, else `Authorization: Bearer KEY`. X-Api-Key comes first because the
    admin endpoints and a policy route's /feedback take the admin token in Authorization."""
    key = headers.get(b"x-api-key")
    if key is None:
        auth = headers.get(b"authorization", b"")
        scheme, _, value = auth.partition(b" ")
        key = value if scheme.lower() == b"bearer" else None
    key = (key or b"").strip()
    return key.decode("latin-1") if key else None


def add_key(path: Path, name: str, requests_per_s: float | None = None, concurrent: int | None = None) -> str:
    """A new random key for `name`: its hash is added to the keys file (created if missing, written whole
    through a rename, so a server reading it never sees half a line); returns the key, which is kept nowhere."""
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    if name in parse_keys(text, str(path)):
        raise ConfigError(f"keys file {path} already has a key named {name!r}; delete its line to replace it")
    key = secrets.token_urlsafe(32)
    quota = {k: v for k, v in (("requests_per_s", requests_per_s), ("concurrent", concurrent)) if v is not None}
    value = hash_key(key) if not quota else "{" + ", ".join(
        [f"sha256: {hash_key(key)}", *(f"{k}: {v:g}" for k, v in quota.items())]) + "}"
    text = (text if not text or text.endswith("\n") else text + "\n") + f"{name}: {value}\n"
    parse_keys(text, str(path))  # the name and quota are checked before anything is written
    write_atomic(path, text, mode=0o600)
    return key

