"""`effnet export`: export and verify a checkpoint's engines ahead of time (workers then start warm)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .argtypes import bounded, existing_dir, int_list


def cmd_export(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    import torch

    from engines.prepare import engine_selection, export_and_verify

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA GPU is visible to PyTorch here", file=sys.stderr)
        return 2
    try:
        names = engine_selection(args.engine, args.device)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    report = export_and_verify(args.tag, names, device=args.device, threads=args.threads or None,
                               batch_sizes=args.batch_sizes, home=args.home)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(f"{report.variant} {Path(report.checkpoint).name}: artefacts in {report.cache}")
        print(f"calibration: {report.calibration}")
        for e in report.engines:
            print(f"  {'ok     ' if e.ok else 'REFUSED'} {e.engine:<17} {e.precision:<5} {e.reason}")
    # Refusals are normal (bf16 on a CPU without it, int8 of an untrained model): exit 0 unless
    # every requested engine failed.
    return 1 if report.all_failed else 0


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
