"""Durable writes: a file is whole or absent, and a truncated one is known as such.

Each write goes to a temporary file in the same folder, is flushed to disk, then renamed over the
target, so a process killed or a disk filled mid-write leaves the old file (or none), never half of a
new one. `write_checked` also records the file's size and sha256 in a sidecar (`NAME.sha256`), so that a
file damaged afterwards (or written by something that did not rename) is found by `read_checked` and
rebuilt by its caller instead of being read by every later start.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

SIDECAR_SUFFIX = ".sha256"


def write_atomic(path: str | os.PathLike, data: bytes | str, mode: int | None = None) -> Path:
    """Write `data` to `path` through a temporary file and a rename; `mode` sets the permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def sidecar(path: str | os.PathLike) -> Path:
    return Path(str(path) + SIDECAR_SUFFIX)


def record(path: str | os.PathLike) -> Path:
    """Write the sidecar of a file already in place (one written by a library, to a temporary name and
    renamed by the caller): its size and sha256."""
    path = Path(path)
    data = path.read_bytes()
    return write_atomic(sidecar(path), json.dumps({"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}))


def write_checked(path: str | os.PathLike, data: bytes | str) -> Path:
    """`write_atomic`, then the sidecar that `read_checked` verifies."""
    write_atomic(path, data)
    record(path)
    return Path(path)


def intact(path: str | os.PathLike) -> bool:
    """Whether `path` exists and matches its sidecar (size and sha256); False without a sidecar."""
    path = Path(path)
    try:
        want = json.loads(sidecar(path).read_text())
        data = path.read_bytes()
    except (OSError, ValueError):
        return False
    return (isinstance(want, dict) and want.get("size") == len(data)
            and want.get("sha256") == hashlib.sha256(data).hexdigest())


def read_checked(path: str | os.PathLike) -> bytes | None:
    """The file's bytes if it matches its sidecar, else None (missing, truncated, or changed since)."""
    path = Path(path)
    if not intact(path):
        return None
    try:
        return path.read_bytes()
    except OSError:
        return None


def writable(folder: str | os.PathLike) -> bool:
    """Whether files can be created in `folder` (made if missing): False on a read-only mount."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".writable.")
    except OSError:
        return False
    os.close(fd)
    os.unlink(tmp)
    return True
