"""`effnet evaluate`: a stored checkpoint measured on a labelled split, the way users check it before serving it."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .argtypes import bounded


def render(r: dict) -> str:
    """The figures as text: top-1 and top-5 beside the manifest's, calibration error, per-class accuracy."""
    lines = [f"{r['tag']} ({r['variant']}) on {r['data']}, {r['split']} split: {r['images']:,} images"]
    recorded = r.get("manifest_top1")
    beside = (f"   (the manifest records {recorded:.2%} on {r['manifest_images']:,} images)"
              if recorded is not None and r.get("manifest_images") else "")
    lines += [f"  top-1  {r['top1']:.2%}{beside}", f"  top-5  {r['top5']:.2%}",
              f"  expected calibration error  {r['ece']:.4f} with scores as the network gives them, "
              f"{r['ece_with_temperature']:.4f} at the manifest's temperature {r['temperature']:g}"]
    width = max(map(len, r["per_class"]), default=0)
    lines.append("  per class:")
    lines += [f"    {name:<{width}}  {'-' if acc is None else f'{acc:.2%}'}" for name, acc in r["per_class"].items()]
    return "\n".join(lines)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from engines.progress import interactive
    from training.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(args.tag, args.data, args.split, limit=args.limit,
                                 show_progress=interactive() and not args.no_progress)
    png = None
    if not args.no_png:
        from training.report import plot_confusion

        png = Path(args.png or f"{args.tag.split(':')[0]}-{args.split}-confusion.png")
        title = f"{args.tag} on {args.data} ({args.split}): top-1 {result['top1']:.2%} on {result['images']} images"
        plot_confusion(result["confusion"], list(result["per_class"]), png, title)
        result["confusion_png"] = str(png)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(render(result))
        if png:
            print(f"confusion matrix: {png}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="measure a stored checkpoint on a labelled split (top-1, top-5, per class, calibration)",
        description="Load a stored checkpoint (its sha256 verified, as the service does) and measure it on the test "
        "or validation split of a dataset, prepared with the checkpoint's own preprocessing: top-1, top-5, per-class "
        "accuracy, and the expected calibration error of its scores with and without the manifest's temperature. "
        "Writes a confusion-matrix PNG. On the data it was trained on it repeats the manifest's figures; --split val "
        "is the very validation split the trainer held out and chose the weights on.")
    p.add_argument("tag", help="checkpoint tag in the store, e.g. compact-fashion-mnist:latest (see `effnet store`)")
    p.add_argument("--data", required=True,
                   help="fashion-mnist, imagefolder:PATH (train/ and val/ class folders, optionally test/) or fake; "
                   "its classes must be the checkpoint's")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="test (default): the split the manifest's top-1 reports; val: the validation split the "
                   "trainer held out (refused for a checkpoint that records none)")
    p.add_argument("--limit", type=bounded(int, 0, 10**9), default=0,
                   help="evaluate only this many images of the split, taken as the trainer's --limit-test takes them "
                   "(default 0: all)")
    p.add_argument("--png", metavar="FILE",
                   help="where to write the confusion matrix (default: NAME-SPLIT-confusion.png in this folder)")
    p.add_argument("--no-png", action="store_true", help="write no confusion-matrix PNG")
    p.add_argument("--json", action="store_true",
                   help="print the figures as JSON (top1, top5 as fractions, per_class, confusion, ece, "
                   "ece_with_temperature, temperature, manifest_top1, images)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar, even on a terminal")
    p.set_defaults(func=cmd_evaluate)
