"""What the chaos run does to a server: find its processes, signal them, damage a cache, copy the
store and make a copy read-only.

BentoML runs each service as `python -m _bentoml_impl.worker.service ... --service-name NAME`, one
process per worker, under an arbiter: the gateway is `effnet-gateway`, each variant's workers are
`service.workers.service_name(variant)` (alone) or that name with `-1`, `-2`, ... (one service per
process). The processes are found under the server's own process, never by a name machine-wide.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

GATEWAY_SERVICE = "effnet-gateway"


def service_processes(root_pid: int) -> list[dict]:
    """[{pid, service, cmdline}] of every BentoML service process under `root_pid` (itself included)."""
    import psutil

    try:
        root = psutil.Process(root_pid)
        procs = [root] + root.children(recursive=True)
    except psutil.Error:
        return []
    out = []
    for p in procs:
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if "--service-name" in cmd and cmd.index("--service-name") + 1 < len(cmd):
            out.append({"pid": p.pid, "service": cmd[cmd.index("--service-name") + 1], "cmdline": " ".join(cmd)[:300]})
    return out


def worker_pids(root_pid: int, variant: str) -> list[int]:
    """The worker processes of `variant`, ordered by service name (replica 1 first)."""
    from service.workers import service_name

    name = service_name(variant)
    found = [p for p in service_processes(root_pid)
             if p["service"] == name or re.fullmatch(re.escape(name) + r"-\d+", p["service"])]
    return [p["pid"] for p in sorted(found, key=lambda p: p["service"])]


def gateway_pids(root_pid: int) -> list[int]:
    return [p["pid"] for p in service_processes(root_pid) if p["service"] == GATEWAY_SERVICE]


def send(pid: int, sig: signal.Signals) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def copy_store(src_home: Path, dst_home: Path) -> Path:
    """A private copy of the store's checkpoints (with their engine caches): the run damages caches and
    makes the store read-only, which it must never do to the real one."""
    src = Path(src_home) / "models"
    if not src.is_dir():
        raise FileNotFoundError(f"no checkpoints in {src_home} (models/ is missing); fill the store first "
                                "(`make checkpoints engines`)")
    dst_home.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dst_home / "models", symlinks=True)
    return dst_home


# The checkpoint's own files; everything else under its folder is a cache a server or `make engines` built.
CHECKPOINT_FILES = {"manifest.json", "model.safetensors", "model.yaml", "confusion.png", "train_log.jsonl"}


def engine_cache_file(home: Path, model_tag: str) -> Path | None:
    """The engine cache file a worker of `model_tag` reads at start: the artefact of the engine auto chose
    (its record, `auto.json`, sits beside the engines), else the largest cache file of the checkpoint."""
    name, _, version = model_tag.partition(":")
    folder = Path(home) / "models" / name
    version = version or "latest"
    if version == "latest" and (folder / "latest").is_file():
        version = (folder / "latest").read_text().strip()
    ckpt = (folder / version).resolve()
    files = [p for p in ckpt.rglob("*") if p.is_file() and not p.is_symlink() and p.name not in CHECKPOINT_FILES
             and not p.name.startswith(".") and p.suffix != ".json" and p.stat().st_size > 0]
    if not files:
        return None
    engine = _auto_choice(ckpt)
    if "int8" in engine and "onnx" in engine:
        preferred = [p for p in files if p.suffix == ".onnx" and "int8" in p.parent.name]
    elif "openvino" in engine:
        preferred = [p for p in files if p.name == "model.bin"]
    elif engine == "onnxruntime":
        preferred = [p for p in files if p.name == "model.onnx" and "int8" not in p.parent.name]
    else:
        preferred = [p for p in files if p.name == "calibration.safetensors"]
    return max(preferred or files, key=lambda p: p.stat().st_size)


def _auto_choice(ckpt: Path) -> str:
    """The engine of auto's latest record under the checkpoint ("" if none)."""
    for rec in ckpt.rglob("auto.json"):
        try:
            choices = json.loads(rec.read_text()).get("choices") or []
        except (OSError, ValueError, AttributeError):
            continue
        if choices:
            return str(choices[0].get("engine") or "")
    return ""


@contextlib.contextmanager
def truncated(path: Path, keep: float = 0.5):
    """`path` cut to `keep` of its size for the duration (a worker killed mid-write); afterwards the
    original is put back unless the service rebuilt the file whole."""
    backup = Path(tempfile.mkdtemp(prefix="effnet-chaos-cache-")) / path.name
    shutil.copy2(path, backup)
    size = path.stat().st_size
    try:
        # A new file renamed over the old one: the truncated bytes never reach another link to it.
        tmp = path.with_name(path.name + ".chaos-tmp")
        with open(backup, "rb") as src, open(tmp, "wb") as dst:
            dst.write(src.read(int(size * keep)))
        os.replace(tmp, path)
        yield {"file": str(path), "size": size, "truncated_to": int(size * keep)}
    finally:
        from store.durable import intact, record

        with contextlib.suppress(OSError):
            if not intact(path):  # not rebuilt by the service: the original, with its size and hash
                tmp2 = path.with_name(path.name + ".chaos-restore")
                shutil.copy2(backup, tmp2)
                os.replace(tmp2, path)
                record(path)
        shutil.rmtree(backup.parent, ignore_errors=True)


class Skipped(RuntimeError):
    """A scenario this machine cannot run; the message says why."""


@contextlib.contextmanager
def read_only_store(home: Path):
    """A home whose `models/` cannot be written: a read-only bind mount as root (chmod stops no root),
    else the copy itself with its write bits removed. Yields (home, how)."""
    models = Path(home) / "models"
    if os.geteuid() == 0:
        view = Path(tempfile.mkdtemp(prefix="effnet-chaos-ro-"))
        (view / "models").mkdir()
        r = subprocess.run(["mount", "--bind", "-o", "ro", str(models), str(view / "models")], capture_output=True,
                           text=True, timeout=30, check=False)
        if r.returncode != 0:
            shutil.rmtree(view, ignore_errors=True)
            raise Skipped(f"running as root and `mount --bind -o ro` failed ({r.stderr.strip()[:200]}); "
                          "chmod cannot make a store read-only for root")
        try:
            probe = view / "models" / ".chaos-write-probe"
            try:
                probe.write_text("x")
                probe.unlink()
                raise Skipped("the read-only bind mount is writable (the kernel ignored `ro`)")
            except OSError:
                pass
            yield view, "read-only bind mount (root)"
        finally:
            subprocess.run(["umount", str(view / "models")], capture_output=True, timeout=60, check=False)
            shutil.rmtree(view, ignore_errors=True)
        return
    modes = {}
    for p in [models, *models.rglob("*")]:
        if p.is_symlink():
            continue
        modes[p] = p.stat().st_mode
        p.chmod(p.stat().st_mode & ~0o222)
    try:
        yield Path(home), "chmod -R a-w of the copy"
    finally:
        for p, mode in modes.items():
            with contextlib.suppress(OSError):
                p.chmod(mode)
