"""`effnet build`: the service's bento, with its checkpoints and engines packed or not; and `Gateway`, what
every bento of this repository serves (`service: cli.build:Gateway` in bentofile.yaml).

Without `--pack-models` the bento holds the code and reads its checkpoints from the model store of the
machine that serves it (the Dockerfile's image: the store mounted at /bentoml). With it, the bento
declares every served checkpoint as a BentoML model (bentofile `models:`), so that `bentoml containerize`
and `bentoml export` copy them into the bento's own `models/` folder, where BentoML points a served
bento's model store (store.paths.served_bento_models): the container needs no store volume. Each
checkpoint's folder carries its engines/ too, prepared here exactly as a worker would at its first start
(cli.serve.prepare_engines), so that a pod neither exports for minutes nor serves eager PyTorch. The
weights are still checked against their sha256 when a worker loads them.

`Gateway` is service.app's, with cli/bentoml_serve.py's supervision applied first: BentoML loads a
bento's service in its main process before it builds the arbiter, so `bentoml serve <bento>` and a
containerized bento's entrypoint restart a crashed worker within half a second and keep the workers'
sockets while they drain, as `effnet serve` does. Only the `cli` layer may import both the wrapper and
the service; bentofile.yaml includes the three files of `cli` that it takes.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENTOFILE = ROOT / "bentofile.yaml"
CONFIG_IN_BENTO = "service/config.yaml"  # service.config.DEFAULT_CONFIG, inside the bento's src/


def __getattr__(name: str):
    if name != "Gateway":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from cli.bentoml_serve import keep_sockets_until_stopped, respawn_promptly

    keep_sockets_until_stopped()
    respawn_promptly()
    from service.app import Gateway

    return Gateway


def packed_models(cfg) -> list[str]:
    """The exact `name:version` of every checkpoint `cfg` serves, each verified by its sha256."""
    from store import verified_tag

    return sorted({verified_tag(v.model) for v in cfg.variants.values()})


def engines_left_behind(cfg) -> list[str]:
    """What a worker of `cfg` would still export or time at start with only what the checkpoints' folders
    hold, one line per variant: artefacts written to the state folder (a read-only store) are not packed."""
    from engines.prepare import unprepared

    from .serve import variant_engines

    before = os.environ.get("EFFNET_STATE_DIR")
    with tempfile.TemporaryDirectory() as empty:
        os.environ["EFFNET_STATE_DIR"] = empty
        try:
            return unprepared(variant_engines(cfg))
        finally:
            if before is None:
                os.environ.pop("EFFNET_STATE_DIR", None)
            else:
                os.environ["EFFNET_STATE_DIR"] = before


def stage(ctx: Path, config: Path, models: list[str]) -> Path:
    """A build context in `ctx`: the files bentofile.yaml includes, `config` as the configuration the bento
    serves, and a bentofile declaring `models`. Returns the bentofile."""
    import yaml

    spec = yaml.safe_load(BENTOFILE.read_text())
    files = {p for pattern in spec["include"] for p in ROOT.glob(pattern) if p.is_file()}
    files.add(ROOT / spec["python"]["requirements_txt"])
    for f in files:
        if "__pycache__" in f.parts:
            continue
        target = ctx / f.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target)
    shutil.copyfile(config, ctx / CONFIG_IN_BENTO)
    if models:
        spec["models"] = models
    spec.setdefault("labels", {})["checkpoints"] = "packed" if models else "store"
    bentofile = ctx / "bentofile.yaml"
    bentofile.write_text(yaml.safe_dump(spec, sort_keys=False))
    return bentofile


def build(config: Path, models: list[str]) -> tuple[int, str]:
    """Run `bentoml build` for `config`'s service, carrying `models` (exact tags; none: it reads the store);
    (exit status, the bento's tag or BentoML's output)."""
    with tempfile.TemporaryDirectory(prefix="effnet-build-") as ctx:
        bentofile = stage(Path(ctx), config, models)
        env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true"}
        env.pop("EFFNET_SERVE_CONFIG", None)  # the bento serves the configuration staged in it
        r = subprocess.run([sys.executable, "-m", "bentoml", "build", "-f", str(bentofile), "-o", "tag", ctx],
                           cwd=ctx, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        return r.returncode, (r.stdout + r.stderr).strip()
    return 0, r.stdout.strip().splitlines()[-1].removeprefix("__tag__:")


def cmd_build(args: argparse.Namespace) -> int:
    from service.config import ConfigError, config_path, load_config

    from .serve import preflight, prepare_engines

    path = config_path(args.config).resolve()
    try:
        cfg = load_config(path)
        problems = preflight(cfg)
    except ConfigError as e:
        print(f"effnet build: {e}", file=sys.stderr)
        return 2
    if args.pack_models:
        if problems:
            print("effnet build --pack-models: " + "; ".join(problems), file=sys.stderr)
            return 1
        if prepare_engines(cfg) != 0:
            print("effnet build --pack-models: some variant has no engine (above)", file=sys.stderr)
            return 1
        left = engines_left_behind(cfg)
        if left:
            print("effnet build --pack-models: the engines are not beside the weights (is the store read-only?): "
                  + "; ".join(left), file=sys.stderr)
            return 1
    rc, out = build(path, packed_models(cfg) if args.pack_models else [])
    if rc != 0:
        print(f"effnet build: bentoml build failed:\n{out}", file=sys.stderr)
        return rc
    packed = "with its checkpoints and engines" if args.pack_models else "reading its checkpoints from the store"
    print(f"built bento {out}, serving {path} {packed}\n  image: bentoml containerize {out}", flush=True)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build",
        help="build the service's bento (bentoml build), optionally with its checkpoints and engines",
        description="Build the bento of the service (bentoml build) into $BENTOML_HOME/bentos, serving the given "
        "configuration under the worker supervision of `effnet serve`. Without --pack-models it reads its "
        "checkpoints from the model store where it is served; with it, the served checkpoints (sha256-verified) "
        "and their engines, prepared here as a worker would, travel in the bento, and `bentoml containerize` "
        "makes an image that needs no store.",
    )
    p.add_argument("--pack-models", action="store_true",
                   help="declare the served checkpoints as the bento's BentoML models and prepare their engines first")
    p.add_argument("--config", help="serving configuration the bento serves (default: $EFFNET_SERVE_CONFIG, "
                   "else service/config.yaml)")
    p.set_defaults(func=cmd_build)
