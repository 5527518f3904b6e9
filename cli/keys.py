"""`effnet keys add NAME`: a new client API key, printed once, its hash added to the keys file."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESCRIPTION = """\
Make a new client API key for NAME, print it once (it is kept nowhere else), and add its sha256 to the
keys file that the server reads (server.api_keys in the serving configuration, else
$EFFNET_API_KEYS_FILE, or --file). A running server takes the new key within server.api_keys_poll_s,
without a restart. --requests-per-s and --concurrent give the key its own quota instead of the
server's defaults. To revoke a key, delete its line from the file.
Exit status 0, or 2 with a message (no keys file configured, a name already there, a bad quota)."""


def add_commands(sub) -> None:
    p = sub.add_parser("keys", help="client API keys: add one to the keys file", description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="make a key, print it once and add its hash to the keys file",
                             description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add.add_argument("name", help="the key's name, as metrics and logs show it (letters, digits, '-', '_', '.')")
    add.add_argument("--file", type=Path, help="the keys file (default: the configuration's server.api_keys, "
                                               "else $EFFNET_API_KEYS_FILE)")
    add.add_argument("--config", help="the serving configuration (default: $EFFNET_SERVE_CONFIG, else "
                                      "service/config.yaml)")
    add.add_argument("--requests-per-s", type=float, metavar="R", help="this key's requests a second")
    add.add_argument("--concurrent", type=int, metavar="N", help="this key's requests at once")
    add.set_defaults(func=run_add)


def run_add(args) -> int:
    from service.config import load_config
    from service.keys import add_key, keys_file

    path = args.file
    if path is None:
        cfg = load_config(args.config)
        path = keys_file(cfg.server.api_keys, cfg.source)
    if path is None:
        raise ValueError("no keys file: set server.api_keys in the serving configuration or $EFFNET_API_KEYS_FILE, "
                         "or give --file")
    key = add_key(path, args.name, args.requests_per_s, args.concurrent)
    print(f"added key {args.name!r} to {path}; the key, shown this once:", file=sys.stderr)
    print(key)
    return 0
