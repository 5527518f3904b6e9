"""Who may change routes, and the record of every attempt.

Route changes (`PATCH /routes/NAME`) are closed unless an admin token is configured: `$EFFNET_ADMIN_TOKEN`
when set, else the token file in the state folder (`store.paths.state_dir()/admin-token`), which
`effnet serve` creates once with a random token, mode 0600, and names at start. A file rather than
only a variable: a server started with no setting is closed to other users of the machine (the file is
readable by its owner only) and to every process that cannot read it, yet its operator can change
routes without restarting it; the token survives restarts, and rewriting the file rotates it.

Every attempt, accepted or refused, is appended to `audit.jsonl` in the state folder, one JSON object a
line: when, the client's address, the token's fingerprint (never the token), the Host header, the route,
before, after, and the result.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from store.durable import write_atomic
from store.paths import state_dir

ADMIN_TOKEN_ENV = "EFFNET_ADMIN_TOKEN"
ADMIN_HOSTS_ENV = "EFFNET_ADMIN_HOSTS"  # comma-separated extra Host names the admin endpoint answers (a proxy's)
TOKEN_FILE = "admin-token"
AUDIT_FILE = "audit.jsonl"


def token_path(folder: str | os.PathLike | None = None) -> Path:
    """The token file in the state folder `folder` (default: this server's, store.paths.state_dir)."""
    return Path(folder or state_dir()) / TOKEN_FILE


def audit_path(folder: str | os.PathLike | None = None) -> Path:
    return Path(folder or state_dir()) / AUDIT_FILE


def ensure_token_file(folder: str | os.PathLike | None = None) -> Path:
    """The token file, created with a random token (mode 0600) if missing."""
    path = token_path(folder)
    if not path.exists():
        write_atomic(path, secrets.token_urlsafe(32) + "\n", mode=0o600)
    return path


def configured_token(folder: str | os.PathLike | None = None) -> str | None:
    """`$EFFNET_ADMIN_TOKEN`, else the token file's content; None when neither is there (changes are closed)."""
    token = os.environ.get(ADMIN_TOKEN_ENV, "").strip()
    if token:
        return token
    try:
        return token_path(folder).read_text().strip() or None
    except OSError:
        return None


def fingerprint(token: str | None) -> str | None:
    """Names a token in the log without giving it away."""
    return hashlib.sha256(token.encode()).hexdigest()[:12] if token else None


class AuditLog:
    """Appends one JSON line per route-change attempt; a line is written whole, with one write."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or audit_path()

    def write(self, **entry: Any) -> dict:
        line = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **entry}
        data = (json.dumps(line, sort_keys=True, default=str) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return line


def read(path: Path | None = None) -> list[dict]:
    """The audit log's entries (for tests and tools); a line cut by a crash is skipped."""
    out = []
    try:
        text = (path or audit_path()).read_text()
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def write_request(request: Any, rid: str, status: int, error: str | None = None, **what: Any) -> None:
    """One line for an admin request's attempt (a route change, a version change): who asked, from where,
    with which token's fingerprint, `what` they asked and the result. A log that cannot be written is an
    error in the server log, not the client's problem."""
    import logging

    given = (request.headers.get("authorization") or "").removeprefix("Bearer ").strip() or None
    try:
        AuditLog().write(client=request.client.host if request.client else None,
                         forwarded_for=request.headers.get("x-forwarded-for"), token=fingerprint(given),
                         host=request.headers.get("host"), **what,
                         result={"status": status, **({"error": error} if error else {})}, request_id=rid)
    except OSError as e:
        logging.getLogger("effnet.gateway").error("admin request %s (%s): the audit log cannot be written: %s",
                                                  rid, status, e)
