"""`effnet`: train, store, serve, benchmark and load-test EfficientNet-B0 variants.

Each area of the project contributes its subcommands through an `add_commands(subparsers)`
function; this file only collects them.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute subcommands, in the order they appear in --help.
COMMAND_MODULES = ["models.cli", "engines.cli", "training.cli", "service.cli", "loadtest.cli"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="effnet",
        description="Train, store, serve and load-test EfficientNet-B0 and the variants of the seed slides.",
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


if __name__ == "__main__":
    sys.exit(main())
