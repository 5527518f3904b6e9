"""`effnet store`: list the checkpoints in the store, and what keeps a broken one from being served."""
from __future__ import annotations

import argparse
import json


def cmd_store(args: argparse.Namespace) -> int:
    from store import list_checkpoints

    rows = list_checkpoints(include_broken=True, verify=args.verify)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("the store is empty; `make checkpoints` fills it")
        return 0

    def num(value, width: int, spec: str = "") -> str:  # a broken manifest may hold anything
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return f"{format(value, spec) if ok else '-':>{width}}"

    print(f"  {'tag':<44} {'variant':<18} {'dataset':<14} {'classes':>7} {'res':>4} {'top-1':>7} {'params':>10}"
          "  created")
    for r in rows:
        mark = "! " if r["problem"] else "  "
        print(f"{mark}{r['tag']:<44} {str(r['variant'] or '-'):<18} {str(r['dataset'] or '-'):<14} "
              f"{num(r['classes'], 7)} {num(r['resolution'], 4)} {num(r['top1'], 7, '.2%')} "
              f"{num(r['params'], 10, ',')}  {r['created'] or '-'}")
        if r["problem"]:
            print(f"    ! {r['problem']}")
    broken = sum(1 for r in rows if r["problem"])
    if broken:
        print(f"{broken} checkpoint(s) marked ! cannot be served: fix or delete their folders")
    if not args.verify:
        # Hashing every weights file reads the whole store (sha256 alone takes about 1.2 s per GB): too
        # slow for every listing of a large store, so it is asked for.
        print("weights not verified (sha256); `effnet store --verify` checks them (the service always does)")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("store", help="list the checkpoints in the store",
                       description="List stored checkpoints ($BENTOML_HOME/models): tag, variant, dataset, number of "
                       "classes, resolution, top-1, parameters, creation time.")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list (tag, variant, dataset, classes, resolution, top1 as a fraction, params, "
                   "created, path, problem: why it cannot be served or null, verified: sha256 checked, null without "
                   "--verify)")
    p.add_argument("--verify", action="store_true",
                   help="also check every weights file against its manifest's sha256 (reads the whole store)")
    p.set_defaults(func=cmd_store)
