"""`effnet export`: export and verify a checkpoint's engines ahead of time (workers then start warm)."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from cli.argtypes import bounded, existing_dir, int_list


def cmd_export(args: argparse.Namespace) -> int:
    from .export import cache_dir
    from .loader import ENGINES, _Checkpoint, _try, _why, auto_candidates
    from .threads import set_threads

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA GPU is visible to PyTorch here", file=sys.stderr)
        return 2
    names = [n.strip() for n in args.engine.split(",") if n.strip()]
    if names == ["all"]:
        names = [n for n in ENGINES if n != "torch"]
    elif names == ["auto"]:
        names = [n for n in auto_candidates(args.device) if n != "torch"]
    for n in names:
        if n not in ENGINES:
            print(f"unknown engine {n!r}; available: all, auto, {', '.join(ENGINES)}", file=sys.stderr)
            return 2
    threads = set_threads(args.threads or None)
    ck = _Checkpoint(args.tag, args.home, args.device, threads, sorted(set(args.batch_sizes)))
    rows, failed = [], 0
    for n in names:
        eng, result = _try(n, ck)
        row = {"engine": n, "ok": eng is not None, "reason": _why(result)}
        if not isinstance(result, str):
            row.update(precision=result.precision, **{k: result.metrics.get(k) for k in
                       ("max_abs_diff", "agreement", "test_top1", "test_top1_reference")})
        else:
            row["precision"] = ENGINES[n].precision
        failed += not row["ok"]
        rows.append(row)
    out = {"checkpoint": str(ck.folder), "cache": str(cache_dir(ck.folder, ck.manifest)),
           "calibration": ck.calibration.source, "engines": rows}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{ck.manifest.variant} {ck.folder.name}: artefacts in {out['cache']}")
        print(f"calibration: {out['calibration']}")
        for r in rows:
            print(f"  {'ok     ' if r['ok'] else 'REFUSED'} {r['engine']:<17} {r['precision']:<5} {r['reason']}")
    # Refusals are normal (bf16 on a CPU without it, int8 of an untrained model): exit 0 unless
    # every requested engine failed.
    return 1 if failed == len(rows) else 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a checkpoint to ONNX / OpenVINO / int8 and verify each engine against eager",
        description="Export a stored checkpoint for the compiled engines, verify each against the eager "
        "PyTorch reference, and cache artefacts and verdicts in the checkpoint's engines/ folder, so "
        "workers start without exporting. Engines that cannot run here or fail verification are "
        "listed with the reason.",
    )
    p.add_argument("tag", help="checkpoint tag (name, name:latest, name:version) or folder")
    p.add_argument("--engine", default="auto",
                   help="comma-separated engines, 'auto' (what engine: auto considers; default) or 'all' "
                        "(also torch-compile, which compiles for about 45 s per batch size)")
    p.add_argument("--batch-sizes", type=int_list(1, 1024, "batch size"), default=[1, 8],
                   help="comma-separated batch sizes the workers will run (default: 1,8)")
    p.add_argument("--threads", type=bounded(int, 0, 1024), default=0, help="inference threads (default 0: all cores)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="verify for this device: cuda checks the GPU engines (default: %(default)s)")
    p.add_argument("--home", type=existing_dir("store"), help="BENTOML_HOME of the store (default: $BENTOML_HOME)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="log each export step")
    p.set_defaults(func=cmd_export)
