"""`effnet serve`: check the configuration and the store, then run `bentoml serve` on the gateway."""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from service.children import die_with_parent
from store.paths import STATE_ENV, bentoml_home, state_dir

if TYPE_CHECKING:
    from engines.prepare import VariantEngine

ROOT = Path(__file__).resolve().parents[1]


CONFIG_HELP = "serving configuration YAML (default: $EFFNET_SERVE_CONFIG, else service/config.yaml)"


def server_tmp_dir(home: Path, port: int | None = None) -> Path:
    """The runtime folder of the server of the store at `home` on `port` (see server_env)."""
    import hashlib
    import tempfile

    digest = hashlib.sha256(str(Path(home).resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / (f"effnet-serve-{digest}" + (f"-{port}" if port else ""))


def server_env(home: Path | None = None, port: int | None = None, state: Path | None = None) -> dict[str, str]:
    """The environment of a `bentoml serve` on the store at `home` (default: $BENTOML_HOME or ~/bentoml), with
    its state folder `state` (default: $EFFNET_STATE_DIR, else the store's).

    TMPDIR is a runtime folder private to the server, per store and port, emptied at every start: every
    BentoML client between services makes a temporary folder that only its finalizer removes, and
    workers stopped by a signal never run it, so what a previous server there left is litter. `effnet
    serve` holds the port's lock (`port_lock`) while it serves, so a start means the previous server of
    that store and port is gone, and a second server of the store, on another port, has a folder of its
    own. The folder is named by a hash of the store and kept in the system's temporary folder, not
    inside the store: BentoML puts its Unix sockets there, and a socket path must stay under 108
    characters.
    """
    import getpass
    import shutil
    import tempfile

    home = bentoml_home(home)
    tmp = server_tmp_dir(home, port)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "BENTOML_HOME": str(home), "TMPDIR": str(tmp)}
    # One state folder for every process of the server (store.paths.state_dir), with the admin token in it:
    # route changes are closed without one (service/audit.py).
    from service.audit import ensure_token_file

    env[STATE_ENV] = str(Path(state or os.environ.get(STATE_ENV) or state_dir(home)).resolve())
    ensure_token_file(env[STATE_ENV])
    # torch.compile's cache lives under the temporary folder by default: keep it in the system's, so that
    # a GPU worker's compiled graphs survive restarts instead of being emptied with the litter.
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}"))
    env.setdefault("BENTOML_DO_NOT_TRACK", "true")  # no usage analytics from a server
    return env


def serve_command(host: str, port: int) -> list[str]:
    """The command line of the server: BentoML's arbiter, the gateway and one worker per variant."""
    # cli.bentoml_serve: `bentoml serve` that keeps its workers' sockets while they drain.
    return [sys.executable, "-m", "cli.bentoml_serve", "serve", "service.app:Gateway", "--host", host, "--port", str(port),
            "--working-dir", str(ROOT)]


def preflight(cfg) -> list[str]:
    """Problems with the stored checkpoints, one line each; raises ConfigError for a label-space mismatch.

    Missing or corrupted checkpoints are only reported: the server then starts not ready and says why
    at /readyz, as it would if a checkpoint broke between two starts.
    """
    from store import CheckpointError, read_manifest

    from service.config import check_label_spaces

    problems, classes = [], {}
    for name, v in cfg.variants.items():
        try:
            m, _ = read_manifest(v.model)
            classes[name] = m.classes
        except CheckpointError as e:
            problems.append(f"variant {name!r}: {e}")
    check_label_spaces(cfg, classes)
    return problems


def example_curl(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return (f"  curl -s -F image=@photo.jpg -H 'X-Client-Id: alice' http://{shown}:{port}/classify\n"
            f"  curl -s -F image=@photo.jpg -F route=imagenet -F top_k=3 http://{shown}:{port}/classify\n"
            f"  curl -s http://{shown}:{port}/variants   # also /routes, /readyz, /metrics, /docs")


def variant_engines(cfg) -> list[VariantEngine]:
    """Each served variant's engine with the engine setting, device, threads and batch sizes its
    worker uses (a single-thread batch runs the same engine with one thread: only the full thread
    count is chosen and recorded)."""
    import torch

    from engines.prepare import VariantEngine
    from service.config import variant_device, variant_threads

    cuda = torch.cuda.is_available()
    return [VariantEngine(name, v.model, v.engine, variant_device(v, cuda), variant_threads(v, cfg),
                          tuple(v.batch_sizes)) for name, v in cfg.variants.items()]


def prepare_engines(cfg) -> int:
    """Export, verify and choose every served variant's engine exactly as its worker will, so that
    auto's choice is recorded and the server's first start only loads the winners. 1 if some variant
    has no engine (its reason is printed)."""
    from engines.prepare import choose
    from service.config import cpu_threads

    from engines.side_by_side import run_side_by_side

    variants = variant_engines(cfg)
    # 1) Export and verify, one single-threaded process per variant, as many at once as there are cores:
    # exports are mostly single-threaded Python. Verdicts are cached by the artefacts' sha256, not by
    # threads, so step 2 reuses them. Every batch size is built here: the int8 engine's compiled models
    # go into OpenVINO's cache (engines/openvino_rt.py), and compiling them here, side by side, beats
    # compiling them in step 2, one variant at a time.
    print("exporting and verifying the engines of " + ", ".join(v.name for v in variants) + " side by side",
          flush=True)
    run_side_by_side({v.name: [sys.executable, "-m", "cli", "export", v.model, "--engine", v.engine, "--threads", "1",
                               "--device", v.device, "--batch-sizes", ",".join(map(str, v.batch_sizes))]
                      for v in variants}, max_jobs=max(1, cpu_threads(cfg)))
    # 2) One variant at a time, alone on the machine: auto's timing must not share the cores.
    print("choosing each variant's engine as its worker will", flush=True)
    failed = 0
    for v in variants:
        try:
            c = choose(v)
        except Exception as e:  # a missing checkpoint, or no engine at all
            print(f"{v.name:<10} FAILED: {e}", flush=True)
            failed += 1
            continue
        d = c.description
        print(f"{v.name:<10} {d.get('engine')} {d.get('precision')} on {v.device}, {v.threads} thread(s), batch sizes "
              f"{list(v.batch_sizes)} ({c.seconds:.0f} s)\n           {d.get('reason')}", flush=True)
        for refused, why in (d.get("refused") or {}).items():
            print(f"           refused {refused}: {why}", flush=True)
    return 1 if failed else 0


def cmd_serve(args: argparse.Namespace) -> int:
    from service.config import CONFIG_ENV, ConfigError, config_path, load_config

    path = config_path(args.config).resolve()
    try:
        cfg = load_config(path)
        problems = preflight(cfg)
    except ConfigError as e:
        print(f"effnet serve: {e}", file=sys.stderr)
        return 2
    if getattr(args, "reset_routes", False):
        from service.route_state import forget

        gone = forget(str(path))
        print(f"effnet serve: forgot the route changes saved in {gone}; serving the routes of {path}" if gone
              else f"effnet serve: no saved route changes for {path}", flush=True)
    if getattr(args, "check", False):
        from engines.prepare import unprepared

        todo = unprepared(variant_engines(cfg))
        for line in todo:
            print(f"effnet serve --check: {line}", file=sys.stderr)
        return 1 if todo else 0
    if getattr(args, "prepare", False):
        if problems:
            print("effnet serve --prepare: " + "; ".join(problems) + "\n  `make checkpoints` fills the default store",
                  file=sys.stderr)
            return 1
        return prepare_engines(cfg)
    lock, holder = port_lock(args.port)
    if lock is None:
        print(f"effnet serve: port {args.port} is taken by another effnet serve ({holder}); stop it, or choose "
              "another port with --port", file=sys.stderr)
        return 2
    busy = port_in_use(args.host, args.port)
    if busy:
        hint = ("Another server may be running there (stop it), or choose another port with --port"
                if "in use" in busy.lower() else
                "--host must be an address of this machine (127.0.0.1, the default; 0.0.0.0 for every interface)")
        print(f"effnet serve: cannot listen on {args.host}:{args.port}: {busy}. {hint}", file=sys.stderr)
        return 2
    for p in problems:
        print(f"effnet serve: warning: {p}\n  the server will start but stay not ready (see /readyz); "
              "`make checkpoints` fills the default store", file=sys.stderr)
    routes = ", ".join(f"{r.name}: {'/'.join(r.split)}" + (f" (shadow {r.shadow.variant})" if r.shadow else "")
                       for r in cfg.routes.values())
    print(f"serving {path} on http://{args.host}:{args.port} (store: {bentoml_home()})\n"
          f"routes: {routes}; default route: {cfg.default_route}\ntry:\n{example_curl(args.host, args.port)}",
          flush=True)
    inside = [n for n, v in cfg.variants.items() if v.placement == "gateway"]
    if inside:
        print(f"served inside the gateway process (placement: gateway, no HTTP hop): {', '.join(inside)}", flush=True)
    if cfg.server.route_changes == "persist":
        from service.route_state import load, state_path

        saved = load(state_path(str(path)))
        if saved:
            print(f"saved route changes for {', '.join(saved)} (PATCH /routes, {state_path(str(path))}) are served "
                  "instead of the file's where the file has not changed since; --reset-routes drops them", flush=True)
    env = {**server_env(port=args.port), CONFIG_ENV: str(path)}
    from service.audit import ADMIN_TOKEN_ENV, audit_path, token_path

    state = env[STATE_ENV]
    print(f"state folder: {state}\nroute changes (PATCH /routes) need 'Authorization: Bearer <token>' with "
          + (f"${ADMIN_TOKEN_ENV}" if os.environ.get(ADMIN_TOKEN_ENV) else f"the token in {token_path(state)}")
          + f"; every attempt is logged to {audit_path(state)}", flush=True)
    try:
        return run_server(serve_command(args.host, args.port), env, cfg.server.drain_grace_s)
    finally:
        import shutil

        shutil.rmtree(env["TMPDIR"], ignore_errors=True)  # the server is gone: its sockets and litter with it
        os.close(lock)


def port_lock(port: int, folder: str | os.PathLike | None = None) -> tuple[int | None, str]:
    """Hold the lock of `port` for as long as this process lives (the descriptor; closing it lets go), or
    (None, who holds it). Two servers started at once on one port would both pass the check that the
    port is free (the arbiter binds it only after slow imports) and then fight over it, the second
    emptying the first's runtime folder; the lock decides which one serves."""
    import fcntl
    import tempfile

    path = Path(folder or tempfile.gettempdir()) / f"effnet-serve-port-{port}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "pid unknown"
        os.close(fd)
        return None, holder
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}, store {bentoml_home()}".encode(), 0)
    return fd, ""


def run_server(cmd: list[str], env: dict[str, str], grace_s: float) -> int:
    """Run the server as a child in a session of its own and exit with it.

    The first SIGTERM or SIGINT (Ctrl-C) is passed on once, as SIGTERM, to BentoML's arbiter, which
    stops its processes while they drain (service/drain.py); a second SIGINT is sent to every process
    of the server (stop now); a third, or the server still running `grace_s` + 15 s after the first signal,
    kills the arbiter and every process it started. A child of its own session gets no terminal signals
    of its own, so each is sent once.
    """
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=die_with_parent)
    signals: list[int] = []
    tree: dict[int, float] = {}  # every process the server has started (pid -> start time), to end them all

    def forward(sig: int, frame: object) -> None:
        signals.append(sig)
        try:
            if len(signals) == 1:
                proc.send_signal(signal.SIGTERM)
            elif len(signals) == 2 and sig == signal.SIGINT:
                for pid in [proc.pid, *tree]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGINT)
            elif len(signals) > 2:
                _kill(tree)
                proc.kill()
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    deadline = None
    while True:
        try:
            code = proc.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            pass
        tree.update(_descendants(proc.pid))
        if signals and deadline is None:
            deadline = time.monotonic() + grace_s + 15
        if deadline is not None and time.monotonic() > deadline:
            print(f"effnet serve: the server is still running {grace_s + 15:.0f} s after the signal; killing it",
                  file=sys.stderr, flush=True)
            _kill(tree)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            deadline = float("inf")
    # BentoML starts each process in a session of its own: none may outlive the arbiter.
    _kill(tree)
    return 128 - code if code < 0 else code


def _descendants(pid: int) -> dict[int, float]:
    import psutil

    try:
        return {p.pid: p.create_time() for p in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return {}


def _kill(tree: dict[int, float]) -> None:
    """SIGKILL the processes of `tree` still running (the same process: same pid and start time)."""
    import psutil

    for pid, started in tree.items():
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            if p.create_time() == started:
                p.kill()


def port_in_use(host: str, port: int) -> str | None:
    """Why `host:port` cannot be listened on, or None. Checked before starting: BentoML's arbiter
    answers a busy port with a traceback from circus, after the slow imports."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: TIME_WAIT is not busy
        try:
            s.bind((host, port))
        except OSError as e:
            return e.strerror or str(e)
    return None


def port_number(text: str) -> int:
    """argparse type for a TCP port: bentoml serve takes --port 99999 and never becomes ready."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is from 1 to 65535, got {port}")
    return port


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the configured variants over HTTP (BentoML gateway + one worker per variant)",
        description="Check the serving configuration and the store, then serve POST /classify, "
        "/classify_batch and GET /variants, /routes, /livez, /readyz, /metrics.",
    )
    p.add_argument("--config", help=CONFIG_HELP)
    p.add_argument("--port", type=port_number, default=3000, help="port (default 3000)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--reset-routes", action="store_true",
                   help="forget the route changes made with PATCH /routes and saved for this configuration "
                   "(server.route_changes: persist), and serve the file's routes")
    p.add_argument("--prepare", action="store_true",
                   help="do not serve: export, verify and choose each variant's engine as its worker will, record "
                   "auto's choice next to the checkpoint, print the choices and exit (`make engines`; the first "
                   "start then only loads the winners)")
    p.add_argument("--check", action="store_true",
                   help="do not serve: exit 0 if every variant's checkpoint is stored and its engine prepared "
                   "(auto's choice recorded, or the named engine verified), else print what is missing and "
                   "exit 1 (`make serve` runs `make checkpoints engines` only then)")
    p.set_defaults(func=cmd_serve)
