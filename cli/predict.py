"""`effnet predict`: image files answered offline exactly as the service answers them over HTTP."""
from __future__ import annotations

import argparse
import csv
import json
import sys

from .argtypes import bounded

# Exit status when some files got an error line instead of an answer (2 stays a usage or checkpoint error).
SOME_UNANSWERED = 1


def table(answers: list, top_k: int) -> str:
    """One line per file: its top-k as `label score`, or `error: why`."""
    width = max((len(a.file) for a in answers), default=0)
    lines = []
    for a in answers:
        if a.error is not None:
            lines.append(f"{a.file:<{width}}  error: {a.error}")
        else:
            lines.append(f"{a.file:<{width}}  " + "  ".join(f"{p['label']} {p['score']:.4f}" for p in a.predictions))
    return "\n".join(lines)


def write_csv(answers: list, out) -> None:
    """One row per prediction (file, rank, index, label, score, error), one row with the error per failed file."""
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["file", "rank", "index", "label", "score", "error"])
    for a in answers:
        if a.error is not None:
            w.writerow([a.file, "", "", "", "", a.error])
            continue
        for rank, p in enumerate(a.predictions, 1):
            w.writerow([a.file, rank, p["index"], p["label"], p["score"], ""])


def cmd_predict(args: argparse.Namespace) -> int:
    from training.evaluate import Predictor, expand_paths

    files = expand_paths(args.paths)
    if not files:
        raise FileNotFoundError(f"no image files under {', '.join(args.paths)} "
                                "(a folder contributes its .jpg, .jpeg, .png, .bmp, .webp and .gif files)")
    predictor = Predictor(args.tag, max_pixels=args.max_pixels, engine=args.engine)
    answers = [predictor.answer(f, args.top_k) for f in files]
    if args.json:
        print(json.dumps([{"file": a.file, **({"error": a.error} if a.error is not None else
                                               {"predictions": a.predictions})} for a in answers], indent=1))
    elif args.csv:
        write_csv(answers, sys.stdout)
    else:
        print(table(answers, args.top_k))
    failed = sum(a.error is not None for a in answers)
    if failed:
        print(f"effnet predict: {failed} of {len(answers)} file(s) not answered", file=sys.stderr)
    return SOME_UNANSWERED if failed else 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    from service.config import ServerConfig
    from service.forms import DEFAULT_TOP_K

    limits = ServerConfig()
    p = sub.add_parser(
        "predict", help="answer image files offline, exactly as the service would",
        description="Classify image files with a stored checkpoint through the service's own path: its decoder "
        "(format sniffed from the bytes, EXIF orientation, every mode to RGB, the same pixel limit), the checkpoint's "
        "resize and crop, and scores as calibrated probabilities (the manifest's temperature), so each answer equals "
        "what POST /classify answers for the same file. A file that cannot be decoded gets an error line; the exit "
        f"status is 0 when every file was answered, {SOME_UNANSWERED} when some were not, 2 for a bad checkpoint.")
    p.add_argument("tag", help="checkpoint tag in the store, e.g. compact-fashion-mnist:latest (see `effnet store`)")
    p.add_argument("paths", nargs="+", metavar="FILE_OR_FOLDER",
                   help="image files (each is tried, whatever its name) or folders (their image files, recursively)")
    p.add_argument("--top-k", type=bounded(int, 1, limits.max_top_k), default=DEFAULT_TOP_K,
                   help=f"predictions per image, highest score first (default {DEFAULT_TOP_K}, as the service; "
                   "capped by the checkpoint's classes)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true",
                     help="a JSON list: {file, predictions: [{label, index, score}]} or {file, error}")
    out.add_argument("--csv", action="store_true",
                     help="CSV with a header: file, rank, index, label, score, error (one row per prediction)")
    p.add_argument("--engine", default="torch",
                   help="inference engine (default torch, the reference; name the one the service runs the variant "
                   "on, e.g. onnxruntime, to compare with its answers)")
    p.add_argument("--max-pixels", type=bounded(int, 1, 10**10), default=limits.max_pixels,
                   help=f"refuse images that declare more pixels (default {limits.max_pixels:,}, the service's "
                   "server.max_pixels)")
    p.set_defaults(func=cmd_predict)
