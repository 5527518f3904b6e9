"""`effnet worker VARIANT`: one variant's worker alone, for a gateway that reaches it at an address.

`python -m cli.worker VARIANT ...` is the same command where `effnet` is not installed (an image built
by `bentoml containerize`, which carries this module but not the whole command line).
The gateway's configuration then says where it is (`workers_at`, docs/configuration.md): a list of URLs,
or a DNS name whose every address is a replica. The worker is the one the gateway would start itself
(service/worker_app.py): it verifies its checkpoint from the store, answers the gateway's calls and
its health checks, and drains on SIGTERM.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .serve import CONFIG_HELP, port_number


def worker_command(host: str, port: int) -> list[str]:
    """The command line of a worker alone: BentoML's arbiter and one worker process."""
    from .serve import ROOT

    return [sys.executable, "-m", "cli.bentoml_serve", "serve", "service.worker_app:Worker", "--host", host,
            "--port", str(port), "--working-dir", str(ROOT)]


def worker_env(variant: str, config: str, port: int, model: str | None = None) -> dict[str, str]:
    """The environment of `effnet worker`: what to serve, and a BentoML home of its own that shares the store.

    `bentoml serve` empties its home's metrics folder when it starts, so a worker beside a gateway (a
    version the gateway loads, or a worker started by hand on the gateway's host) would wipe the
    gateway's metrics; its home is a folder of the store's `run/` with `models` linked to the store, and
    the core slots and the state folder (engine caches, tokens) stay the store's, shared with the gateway.
    """
    from service.config import CONFIG_ENV
    from service.cpu_slots import SLOTS_ENV, slots_dir
    from service.worker_app import MODEL_ENV, VARIANT_ENV
    from store.paths import STATE_ENV, bentoml_home, models_dir, state_dir

    from .serve import server_env

    home = bentoml_home()
    own = home / "run" / f"worker-{variant}-{port}"
    own.mkdir(parents=True, exist_ok=True)
    link = own / "models"
    if not link.is_symlink():
        link.symlink_to(models_dir(home).resolve(), target_is_directory=True)
    state = Path(os.environ.get(STATE_ENV) or state_dir(home))
    env = {**server_env(own, port, state), SLOTS_ENV: os.environ.get(SLOTS_ENV) or str(slots_dir()),
           CONFIG_ENV: config, VARIANT_ENV: variant}
    if model:
        env[MODEL_ENV] = model
    return env


def cmd_worker(args: argparse.Namespace) -> int:
    from service.config import ConfigError, config_path, load_config
    from service.worker_app import TOKEN_ENV, worker_token
    from store import CheckpointError, read_manifest
    from store.paths import bentoml_home

    from .serve import port_in_use, run_server

    path = config_path(args.config).resolve()
    try:
        cfg = load_config(path)
    except ConfigError as e:
        print(f"effnet worker: {e}", file=sys.stderr)
        return 2
    if args.variant not in cfg.variants:
        print(f"effnet worker: {args.variant!r} is not a variant of {path}; "
              f"variants: {', '.join(sorted(cfg.variants))}", file=sys.stderr)
        return 2
    v = cfg.variants[args.variant]
    model = args.model or v.model
    busy = port_in_use(args.host, args.port)
    if busy:
        print(f"effnet worker: cannot listen on {args.host}:{args.port}: {busy}", file=sys.stderr)
        return 2
    try:
        read_manifest(model)
    except CheckpointError as e:
        print(f"effnet worker: warning: checkpoint {model!r}: {e}\n  the worker will start but stay not ready "
              "(its /readyz says why)", file=sys.stderr)
    print(f"serving variant {args.variant} ({model}) on http://{args.host}:{args.port} (store: {bentoml_home()})",
          flush=True)
    if not worker_token():
        print(f"effnet worker: {TOKEN_ENV} is not set: any client that reaches this port can call it; set it here "
              "and in the gateway's environment where the network is not private to them", file=sys.stderr)
    return run_server(worker_command(args.host, args.port), worker_env(args.variant, str(path), args.port, model),
                      cfg.server.drain_grace_s)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker",
        help="serve one variant's worker alone, for a gateway on another host (its workers_at)",
        description="Serve one variant's worker (the process the gateway starts for a variant) on its own, so "
        "that a gateway whose configuration lists its address in the variant's `workers_at` calls it across "
        "the network: on another host, in another container, or as a Kubernetes pod behind a headless Service.",
    )
    p.add_argument("variant", help="the variant to serve, as named in the configuration")
    p.add_argument("--config", help=CONFIG_HELP)
    p.add_argument("--port", type=port_number, default=3000, help="port (default 3000)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 in a container)")
    p.add_argument("--model", help="store tag to serve instead of the configured one (a version of the variant)")
    p.set_defaults(func=cmd_worker)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cli.worker")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["worker", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
