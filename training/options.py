"""The options of `effnet train` and `python -m training`: every TrainConfig field as a flag with its help,
and the rules of a resumed run's configuration. `training/config.py` holds the defaults; this module only
presents them.
"""
from __future__ import annotations

import argparse

from .config import BOUNDS, RECIPES, RENAMED, TrainConfig, config_fields, resolve_config

HELP = {
    "variant": "registered variant or alias (`effnet models`), e.g. b0, mec (= mec-out-e3), compact",
    "data": "fashion-mnist ($FASHION_MNIST_DIR, else /usr/share/datasets/fashion-mnist, else torchvision's download), "
    "imagefolder:PATH (PATH/train/CLASS/*.jpg, and PATH/val/CLASS/*.jpg as the test split: the ImageNet layout), "
    "or fake (tiny generated set for tests)",
    "recipe": "quick: the 2-CPU-core budget (0.75 epoch at 40x40; ~17 min for b0, mec and compact side by side on Fashion-MNIST); full: RandAugment, longer schedule, more regularisation",
    "name": "store name (default: {variant}-{dataset}, e.g. b0-fashion-mnist, which the service serves)",
    "teacher": "store tag of a trained checkpoint to distil from (same classes), e.g. b0-fashion-mnist:latest",
    "init": "store tag of a checkpoint of the same variant whose weights start the run (fine-tuning), e.g. "
            "lite0-imagenet:latest; the classifier starts afresh when the classes differ, an RGB stem is summed "
            "for gray data",
    "epochs": "epochs of the cosine schedule; a fraction (e.g. 0.8) stops the last pass early",
    "batch_size": "images per process per step (the LR scales with the global batch / 128)",
    "lr": "peak AdamW learning rate for a global batch of 128",
    "min_lr_ratio": "cosine floor as a fraction of the peak LR",
    "warmup_epochs": "linear LR warmup, in epochs (fractions allowed)",
    "weight_decay": "AdamW decoupled weight decay (not on BN or biases)",
    "clip_grad": "max global gradient norm (0: off)",
    "label_smoothing": "label smoothing of the cross-entropy",
    "drop_rate": "dropout before the classifier",
    "drop_path_rate": "stochastic depth rate of the last block (linear from 0 over the blocks)",
    "auto_augment": "torchvision augmentation policy on uint8 tensors: randaugment, autoaugment, trivialaugment or none",
    "randaugment_magnitude": "RandAugment magnitude (0-30)",
    "crop_pad": "random translation as a fraction of the side (reflect padding + random crop; not for imagefolder)",
    "hflip": "random horizontal flips",
    "random_erasing": "probability of erasing one random rectangle per image",
    "ema_decay": "per-step decay of the weight EMA; both are evaluated and the better one exported",
    "ema_warmup": "ramp the EMA decay as (1+n)/(10+n) over the first steps",
    "bn_recalibrate": "after the last epoch, recompute BatchNorm statistics over this many training batches (0: off)",
    "kd_alpha": "with --teacher: weight of the distillation loss (the rest is the label loss)",
    "kd_temperature": "with --teacher: softmax temperature of the distillation",
    "resolution": "training and evaluation input side; Fashion-MNIST's 28x28 is resized to it as the service does",
    "amp": "mixed precision: auto (off on CPU, where bf16 slows training; bf16 or fp16 on CUDA), off, bf16, fp16",
    "channels_last": "NHWC memory format (much faster on CPU and GPU)",
    "workers": "DataLoader worker processes",
    "device_data": "keep an in-memory training set (fashion-mnist, fake) on the training device and augment it "
    "there: auto (on with CUDA), on, off (a DataLoader; imagefolder always uses one)",
    "augment_chunk": "with device data: images that share one draw of the augmentation policy",
    "threads": "torch threads per process (0: CPU cores / processes on this node)",
    "seed": "seed for weights, data order, augmentation, dropout",
    "deterministic": "deterministic CUDA algorithms (slower)",
    "eval_every": "evaluate model and EMA every N epochs (0: only after the last)",
    "time_budget": "seconds for the epochs (0: off): after ~50 timed steps, --epochs is cut to the whole epochs "
    "that fit, and the cosine schedule ends there",
    "log_every": "progress-bar refresh interval in steps",
    "run_dir": "folder for the resumable training state and epoch log (default: $BENTOML_HOME/runs/NAME)",
    "stop_after_epoch": "stop after this epoch with the state saved and no checkpoint (simulates an interruption)",
    "limit_train": "use only the first N training images (smoke runs)",
    "limit_test": "use only the first N test and validation images (smoke runs)",
    "val_size": "validation images held out of the training set, on which the EMA-or-model choice is made "
    "(the test split is evaluated once, at the end): a count, a fraction (< 1), 0 for none, -1 for 5000 of "
    "Fashion-MNIST or a tenth of an image folder's train/ (one with a test/ folder validates on val/)",
    "val_seed": "seed of the validation split, apart from --seed so that every run chooses on the same images",
    "sync_bn": "synchronise BatchNorm statistics across processes",
    "dist_backend": "torch.distributed backend: auto (nccl on CUDA, gloo on CPU), gloo or nccl",
}


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Every TrainConfig field as an option whose default is None, so a YAML file or recipe can set it."""
    base = TrainConfig()
    p.add_argument("-c", "--config", metavar="FILE.yaml",
                   help="YAML file of option: value pairs (same names as the options, - or _) used as defaults; "
                   "command-line options override it")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a run from the state in RUN_DIR (state.safetensors + state.json): model, EMA, "
                   "optimizer, LR step, scaler, epoch and RNG states")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes on this machine: >1 launches torchrun (DDP; one per GPU, or gloo on CPU)")
    p.add_argument("--nnodes", type=int, default=1,
                   help="machines in the run: >1 launches torchrun's c10d rendezvous at --rdzv-endpoint; run the "
                   "same command on every machine, each with its --node-rank (docs/training.md)")
    p.add_argument("--node-rank", type=int, default=0, help="this machine's number, 0..NNODES-1; 0 hosts the rendezvous")
    p.add_argument("--rdzv-endpoint", default="", metavar="HOST:PORT",
                   help="node 0's address and a free port on it, the same on every machine (with --nnodes > 1)")
    p.add_argument("--skip-existing", action="store_true", help="do nothing if NAME:latest is already in the store")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar, a line every 100 steps instead, as without a terminal (one line per epoch "
                   "still prints)")
    quick = RECIPES["quick"]
    for f in config_fields().values():
        opt = "--" + f.name.replace("_", "-")
        default = getattr(base, f.name)
        shown = f"full: {default!r}" + (f", quick: {quick[f.name]!r}" if f.name in quick else "") + (
            f"; in {BOUNDS[f.name]}" if f.name in BOUNDS else "")
        if f.name in ("variant", "data"):
            p.add_argument(opt, default=None, required=False, help=f"{HELP[f.name]} (default {default!r})")
            continue
        if f.name == "recipe":
            p.add_argument(opt, choices=sorted(RECIPES), default=None, help=f"{HELP[f.name]} (default {default})")
            continue
        kind = type(default)
        opts = [opt] + ["--" + old.replace("_", "-") for old, new in RENAMED.items() if new == f.name]
        if kind is bool:
            p.add_argument(*opts, action=argparse.BooleanOptionalAction, default=None, help=f"{HELP[f.name]} ({shown})")
        else:
            p.add_argument(*opts, type=kind, default=None, help=f"{HELP[f.name]} ({shown})")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training", description="Train an EfficientNet variant into the checkpoint store",
                                add_help=add_help)
    add_train_arguments(p)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return resolve_config(vars(args), args.config)


RESUME_MAY_CHANGE = {"name", "threads", "workers", "log_every", "eval_every", "stop_after_epoch", "run_dir"}


def resume_config(args: argparse.Namespace) -> TrainConfig:
    """The configuration stored in --resume's state.json, with the options given that it may change.

    A bare `--resume RUN_DIR` (what the stop message suggests) used the defaults and failed with a
    size-mismatch traceback. Given options that differ from the stored ones are refused, by name.
    """
    from .config import current_names, load_yaml
    from .state import read_state_meta

    known = config_fields()
    stored = {k: v for k, v in current_names(read_state_meta(args.resume)["config"]).items() if k in known}
    given = {**(load_yaml(args.config) if args.config else {}),
             **{k: v for k, v in vars(args).items() if v is not None and k in known}}
    if "variant" in given:  # an alias (b0-compact) names the variant the state stores canonically
        from models import get_variant

        same = get_variant(given["variant"]).name == get_variant(stored.get("variant", "")).name
        given["variant"] = stored["variant"] if same else given["variant"]
    differ = sorted(k for k, v in given.items() if k not in RESUME_MAY_CHANGE and v != stored.get(k))
    if differ:
        raise ValueError(f"--resume {args.resume}: the run was started with "
                         + ", ".join(f"--{k.replace('_', '-')} {stored.get(k)!r}" for k in differ)
                         + ", this command gives " + ", ".join(f"{given[k]!r}" for k in differ)
                         + ": leave these options out (the stored configuration is used) or start a new run")
    return resolve_config({**stored, **{k: v for k, v in given.items() if k in RESUME_MAY_CHANGE}})
