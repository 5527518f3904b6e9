"""`effnet`: train, store, serve, benchmark and load-test EfficientNet-B0 variants.

Each module of this package holds the subcommands of one area of the project and adds them with
`add_commands(subparsers)`: `models.py` (models, bench), `engines.py` (export), `training.py` (train,
train-many, train-bench, import-pretrained), `store.py` (store), `serve.py` (serve), `loadtest.py`
(loadtest, report), `experiment.py` (experiment), `dashboard.py` (dashboard), `cascade.py` (cascade), `keys.py` (keys), `plan.py` (plan), `worker.py` (worker: one variant's worker alone), `rollout.py` (rollout). This file only collects them.
The command sits above every package and no package imports it (.importlinter).
`build.py` (build) builds the service's bento, and names what the bento serves.
`evaluate.py` (evaluate) and `predict.py` (predict) check a stored checkpoint offline.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# What a user's mistake raises here: an unknown variant (KeyError), missing data or training state,
# bad values (ValueError, service.config.ConfigError), a missing or corrupted checkpoint.
USER_ERRORS = (KeyError, ValueError, FileNotFoundError, NotADirectoryError)


def is_user_error(e: BaseException) -> bool:
    # store.CheckpointError is looked up, not imported: importing the store imports torch (2 s), and
    # `effnet --help` should not wait for it. A CheckpointError was raised only if the store was loaded.
    store = sys.modules.get("store.checkpoint")
    return isinstance(e, USER_ERRORS) or (store is not None and isinstance(e, store.CheckpointError))

DESCRIPTION = """\
Train, store, serve and load-test EfficientNet-B0 and the variants of the seed slides.

The loop, one command a step:
  effnet models                  the registered variants, their parameters and MACs
  effnet train / train-many      train variants into the checkpoint store ($BENTOML_HOME)
  effnet import-pretrained       store published weights (Lite0 on ImageNet) the same way
  effnet store                   list the stored checkpoints
  effnet evaluate                measure a checkpoint on a labelled split: accuracy, calibration
  effnet predict                 answer image files offline, as the service would
  effnet export                  export and verify a checkpoint's inference engines
  effnet serve                   serve the configured variants over HTTP (--prepare: engines first)
  effnet loadtest / report       load the running service and report accuracy, latency, throughput
  effnet plan                    replicas per variant and hardware for a request rate and p99
  effnet experiment              a running server's A/B experiments: accuracy, intervals, decisions
  effnet dashboard               the Grafana dashboard of the service's metrics, as JSON
  effnet cascade fit ROUTE       a cascade route's thresholds, chosen on the validation split
  effnet keys add NAME           a client API key, printed once, its hash added to the keys file
  effnet build                   the service's bento (--pack-models: with its checkpoints and engines)
  effnet bench / train-bench     time inference and training offline on this machine"""

# Modules that contribute subcommands, in the order they appear in --help.
COMMAND_MODULES = ["cli.models", "cli.engines", "cli.training", "cli.store", "cli.evaluate", "cli.predict", "cli.serve",
                   "cli.loadtest", "cli.chaos", "cli.soak", "cli.experiment", "cli.dashboard", "cli.cascade",
                   "cli.keys", "cli.worker", "cli.rollout", "cli.plan", "cli.build"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="effnet",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `effnet COMMAND --help` for each command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int((args.func(args, extra) if getattr(args, "passthrough", False) else args.func(args)) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        # A wrong name, path, value or checkpoint: the message says what to do; a traceback would bury it.
        if os.environ.get("EFFNET_DEBUG") or not is_user_error(e):
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"effnet {args.command}: error: {message}\n  (EFFNET_DEBUG=1 shows where it was raised)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
