"""`effnet models` (the variant table) and `effnet bench` (offline speed)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .argtypes import bounded, int_list


def progress_printer(stream):
    """A progress callback: one line rewritten in place on a terminal, plain lines in a log or CI."""
    if stream.isatty():
        return lambda s: print(f"\r{s:<60}", end="", file=stream, flush=True)
    return lambda s: print(s, file=stream, flush=True)


def _variant_rows(resolution: int, num_classes: int, family: str | None) -> list[dict]:
    from models import count_macs, count_params, create_model, get_variant, list_aliases, list_models

    aliases: dict[str, list[str]] = {}
    for alias, target in list_aliases().items():
        aliases.setdefault(target, []).append(alias)
    rows = []
    for name in list_models(family):
        info = get_variant(name)
        model = create_model(name, num_classes=num_classes)
        params = count_params(model)
        # The slides' figures are for 1000 classes; a difference is only meaningful there.
        comparable = num_classes == 1000 and info.seed_params is not None
        diff = (params + info.seed_offset - info.seed_params) / info.seed_params * 100 if comparable else None
        rows.append(
            {
                "name": name,
                "family": info.family,
                "params": params,
                "macs": count_macs(model, resolution),
                "seed_params": info.seed_params,
                "seed_offset": info.seed_offset,
                "params_diff_pct": None if diff is None else round(diff, 3),
                "seed_macs": info.seed_macs,
                "aliases": sorted(aliases.get(name, [])),
                "description": info.description,
            }
        )
    return rows


def cmd_models(args: argparse.Namespace) -> int:
    rows = _variant_rows(args.resolution, args.num_classes, args.family)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{len(rows)} variants, {args.num_classes} classes, MACs at {args.resolution}x{args.resolution}")
    print(f"{'name':<28} {'family':<8} {'params':>11} {'MACs (M)':>9} {'slides':>7} {'diff':>7}  aliases")
    print("-" * 90)
    for r in rows:
        seed = f"{r['seed_params'] / 1e6:.2f}M" if r["seed_params"] else "-"
        diff = f"{r['params_diff_pct']:+.2f}%" if r["params_diff_pct"] is not None else "-"
        print(
            f"{r['name']:<28} {r['family']:<8} {r['params']:>11,} {r['macs'] / 1e6:>9.2f} {seed:>7} {diff:>7}  "
            f"{', '.join(r['aliases'])}"
        )
    if any(r["seed_offset"] for r in rows) and args.num_classes == 1000:
        print("\ndiff for the compact family adds the constant 0.321M that the compact paper counts in every row.")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from models.bench import REFERENCE, format_table, machine_info, run_bench

    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    from models import get_variant

    for n in names:
        if n != REFERENCE:
            get_variant(n)  # fail fast with the list of known names
    batches = args.batches or ([1, 8] if args.engines else [1, 8, 32])
    progress = None if args.json or args.quiet else progress_printer(sys.stderr)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA GPU is visible to PyTorch here; use --device cpu", file=sys.stderr)
        return 2
    failed: dict[str, str] = {}
    if args.engines:  # every engine and precision (engines/bench.py), eager reference included
        from engines.bench import format_engine_table, run_engine_bench, select_engines, skipped_engines

        engines = select_engines(args.engines, device)
        rows = run_engine_bench(names, engines, batches, args.resolution, args.rounds, args.seconds,
                                threads=args.threads or None, progress=progress, device=device, failed=failed)
        format_table = format_engine_table  # noqa: F811 - the engines' table for these rows
    else:
        rows = run_bench(names, batches, args.resolution, args.rounds, args.seconds, device=device, progress=progress)
    if progress and sys.stderr.isatty():
        print("\r" + " " * 60 + "\r", end="", file=sys.stderr)
    info = machine_info()
    info.update(device=device, resolution=args.resolution, rounds=args.rounds, layout="channels_last, inference_mode, eager")
    if args.engines:
        info.update(layout="uint8 input, normaliser inside every graph", engines=engines,
                    unavailable=skipped_engines(device))
        if failed:
            info["failed"] = failed
    if args.record:
        out = Path(args.record)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"machine": info, "rows": rows}, indent=2) + "\n")
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(" | ".join(f"{k}: {v}" for k, v in info.items()))
        print(format_table(rows))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models",
        help="list every registered variant with parameters, MACs and the slides' figures",
        description="Print every registered variant: family, parameters, MACs at a chosen resolution, "
        "the slides' parameter figure where they give one, and the relative difference.",
    )
    p.add_argument("--resolution", type=bounded(int, 32, 4096), default=224, help="input side for the MAC count (default 224)")
    p.add_argument("--num-classes", type=bounded(int, 1, 100_000), default=1000, help="classifier size (default 1000, as the slides)")
    p.add_argument("--family", choices=["b0-se", "compact", "mec"], help="only this family")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "bench",
        help="time batch-1 latency and batch-8/32 throughput of the main variants",
        description="Offline inference speed (PyTorch eager, channels_last, inference_mode) of the chosen "
        "variants beside torchvision's efficientnet_b0, interleaved so machine noise hits all alike. "
        "Runs on the GPU when one is present.",
    )
    p.add_argument("--models", default="b0,lite0,compact,mec,torchvision-b0",
                   help="comma-separated variant names; 'torchvision-b0' is the reference (default: %(default)s)")
    p.add_argument("--batches", type=int_list(1, 1024, "batch size"),
                   help="comma-separated batch sizes (default: 1,8,32; 1,8 with --engines)")
    p.add_argument("--engines", metavar="LIST",
                   help="time these inference engines too: 'all' (every engine that runs here) or a "
                        "comma-separated list (torch, torch-fp16 [GPU], torch-compile, onnxruntime, onnxruntime-int8, "
                        "openvino, openvino-bf16, openvino-int8); rows gain engine and precision")
    p.add_argument("--resolution", type=bounded(int, 32, 4096), default=224, help="input side (default 224)")
    p.add_argument("--rounds", type=bounded(int, 1, 1000), default=3, help="interleaved rounds (default 3)")
    p.add_argument("--seconds", type=bounded(float, 0.001, 3600, " s"), default=0.6,
                   help="time per model and batch in each round (default 0.6)")
    p.add_argument("--threads", type=bounded(int, 0, 1024), default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to run: auto = the GPU when PyTorch sees one, else the CPU (default: %(default)s)")
    p.add_argument("--record", metavar="FILE", help="also write machine info and rows as JSON to FILE")
    p.add_argument("--json", action="store_true", help="print a JSON list of rows")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=cmd_bench)
