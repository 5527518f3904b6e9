"""The trainer: `main(cfg)` trains one variant and writes one verified checkpoint into the store.

Shaped like torchvision's references/classification/train.py: `load_data()` (training/data.py),
`train_one_epoch()` and `evaluate()` (training/loop.py), `main()`, and `get_args_parser()`
(training/options.py). Runs as one process, or as N under torchrun (`effnet train --nproc N`, on several
nodes with `--nnodes`, or `torchrun ... -m training`) with a DistributedSampler; rank 0 evaluates, logs and saves.
`run(args)` is the entry point of the command: resume rules, torchrun, Ctrl-C and SIGTERM.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.progress import interactive
from store.paths import bentoml_home

from .config import TrainConfig
from .options import config_from_args, resume_config


def dataset_name(data: str) -> str:
    """The `dataset` label a DATA argument gets (known before loading it, for --skip-existing)."""
    if data.startswith("imagefolder:"):
        return Path(data.split(":", 1)[1]).expanduser().resolve().name.lower() or "imagefolder"
    return data


def checkpoint_name(variant: str, data: str, name: str = "") -> str:
    """`{canonical variant}-{dataset}` (e.g. b0-fashion-mnist, mec-out-e3-fashion-mnist): what the service asks for."""
    from models import get_variant

    return (name or f"{get_variant(variant).name}-{dataset_name(data)}").lower()


def check_store_name(name: str) -> str:
    """Refuse, before training, a name the store would refuse after it (BentoML's own tag rules)."""
    from bentoml._internal.tag import Tag

    try:
        Tag(name)
    except ValueError as e:
        raise ValueError(f"cannot store a checkpoint named {name!r}: {str(e).split(': ', 1)[-1]}; choose one "
                         "with --name") from None
    return name


def default_run_dir(name: str) -> Path:
    home = bentoml_home()
    return home / "runs" / name


def run_dir_for(cfg: TrainConfig, name: str, resume: str | None = None) -> Path:
    """Where a run keeps its state and log: the resumed folder, else --run-dir, else runs/NAME."""
    return Path(resume) if resume else Path(cfg.run_dir) if cfg.run_dir else default_run_dir(name)


LOCK_FILE = "run.lock"


def lock_run_dir(run_dir: Path):
    """An exclusive lock on `run_dir` for this process's life; ValueError naming the run that holds it.

    Two trainings of one --name shared runs/NAME: each wrote its epochs into the other's
    train_log.jsonl and state, and both checkpoints carried the mixed log. flock is released by the
    kernel when the process ends, however it ends, so a killed run leaves no stale lock.
    """
    import fcntl

    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"--run-dir {run_dir} is a file: give a folder (it holds the training state)")
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ValueError(f"{run_dir} is in use by another training ({holder}): wait for it to end, or give this "
                         "run another --name or --run-dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}: {' '.join(sys.argv)}\n")
    f.flush()
    return f


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "off":
        return None
    if amp == "auto":
        if device.type != "cuda":
            return None  # bf16 autocast trains slower on a CPU (TrainConfig.amp)
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # No decay on BN parameters and biases: decaying them only fights the normalisation.
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def use_device_data(cfg: TrainConfig, data, device: torch.device) -> bool:
    """Whether the training split lives on `device` (DeviceBatches) rather than behind a DataLoader."""
    from .data import TensorImages

    if cfg.device_data == "off" or not isinstance(data.train, TensorImages):
        return False  # imagefolder decodes files: that stays in DataLoader workers
    return cfg.device_data == "on" or device.type == "cuda"


def main(cfg: TrainConfig, resume: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Train `cfg.variant` on `cfg.data`; returns {"tag", "metrics", "run_dir", ...} on rank 0."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    from models import count_macs, count_params, create_model, get_variant, model_config
    from store import InputNormalizer, Manifest, load_checkpoint, resize_crop, save_checkpoint

    from . import distributed as dist_utils
    from .data import DeviceBatches, load_data
    from .loop import ModelEma, evaluate, recalibrate_bn, train_one_epoch
    from .report import CONFUSION_FILE, LOG_FILE, append_jsonl, plot_confusion
    from .state import load_state, mark_exported, save_state

    rank, world, local = dist_utils.init_distributed(cfg.dist_backend)
    main_proc = rank == 0
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // local_world))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if cfg.deterministic and device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    log = print if main_proc else (lambda *a, **k: None)
    # A bar where a person watches a terminal; in logs, CI and `train-many` a line every 100 steps.
    bar = progress and main_proc and interactive()

    # 1) data and what the manifest says about it
    variant = get_variant(cfg.variant).name
    name = checkpoint_name(variant, cfg.data, cfg.name)
    # A resumed run writes its state and log back where it was read from, whatever its --name.
    run_dir = run_dir_for(cfg, name, resume)
    # Held until main returns (the file object is closed with this frame) or the process ends.
    run_lock = lock_run_dir(run_dir) if main_proc else None  # noqa: F841
    if resume:  # before anything is built: a state of another variant failed with a size-mismatch traceback
        from .state import read_state_meta

        stored = read_state_meta(resume)["config"]
        for key in ("variant", "data", "resolution", "batch_size"):
            if stored.get(key) != getattr(cfg, key):
                raise ValueError(f"--resume {resume}: it trained {key}={stored.get(key)!r}, this run "
                                 f"{getattr(cfg, key)!r}; resume with the same {key} (leave it out and the stored "
                                 "one is used)")
    t_data = time.perf_counter()
    data = load_data(cfg)
    log(f"data {cfg.data}: {len(data.train)} train / {len(data.val) if data.val else 0} validation / "
        f"{len(data.test)} test images, {len(data.classes)} classes, "
        f"{data.in_chans} channel(s) at {cfg.resolution}x{cfg.resolution} ({time.perf_counter() - t_data:.1f} s)")
    if min(cfg.batch_size, len(data.train) // world) < 2:
        # BatchNorm cannot normalise one image over a 1x1 map ("Expected more than 1 value per channel").
        raise ValueError(f"a training step needs at least 2 images per process (BatchNorm), got batch size "
                         f"{cfg.batch_size} and {len(data.train)} training image(s) for {world} process(es): "
                         "raise --limit-train / --batch-size")
    net_cfg = model_config(variant, drop_rate=cfg.drop_rate, drop_path_rate=cfg.drop_path_rate)
    manifest = Manifest(
        variant=variant, config=net_cfg.to_dict(), num_classes=len(data.classes), classes=data.classes,
        dataset=data.dataset, resolution=cfg.resolution, in_chans=data.in_chans, mean=list(data.mean),
        std=list(data.std), resize=data.resize, grayscale=data.grayscale,
    )
    normalize = InputNormalizer(manifest).to(device)

    # 2) model, EMA, optimizer, precision: the same initial weights on every rank
    seed_everything(cfg.seed)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = create_model(variant, num_classes=manifest.num_classes, in_chans=manifest.in_chans,
                         drop_rate=cfg.drop_rate, drop_path_rate=cfg.drop_path_rate)
    if cfg.init and not resume:  # before the EMA copies the weights; a resumed run has its own
        from .finetune import init_from_checkpoint

        start = init_from_checkpoint(model, cfg.init, variant, manifest.classes)
        known = f", top-1 {start['top1']:.2%}" if isinstance(start["top1"], (int, float)) else ""
        log(f"initialised from {cfg.init} ({start['dataset']}{known}): {start['loaded']} tensors "
            f"as stored" + (f", {', '.join(start['adapted'])} adapted to {manifest.in_chans} input channel(s)"
                             if start["adapted"] else "")
            + (f", {len(start['reset'])} initialised afresh ({', '.join(start['reset'][:4])}"
               f"{'...' if len(start['reset']) > 4 else ''})" if start["reset"] else ""))
    model = model.to(device, memory_format=memory_format)
    ema = ModelEma(model, cfg.ema_decay, cfg.ema_warmup)
    global_batch = cfg.batch_size * world
    peak_lr = cfg.lr * global_batch / 128  # linear scaling rule (Goyal et al.) from the base batch of 128
    # Fused on CUDA: 6 ops per step instead of the foreach step's 447 for b0, which left the GPU waiting
    # for the host (benchmarks/gpu/README.md). Not on the CPU: it would change the quick recipe's weights
    # for no measurable gain (a step there is ~1 s of convolutions).
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=peak_lr, fused=device.type == "cuda")
    amp_dtype = resolve_amp(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    if world > 1:
        if cfg.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local] if device.type == "cuda" else None)
    net = model.module if world > 1 else model

    teacher = teacher_input = None
    if cfg.teacher:
        teacher, t_man = load_checkpoint(cfg.teacher, device=str(device))
        if t_man.classes != manifest.classes:
            raise ValueError(f"teacher {cfg.teacher} predicts {t_man.num_classes} other classes than {cfg.data}")
        teacher = teacher.to(memory_format=memory_format).eval()
        t_norm = InputNormalizer(t_man).to(device)

        def teacher_input(images: torch.Tensor) -> torch.Tensor:
            # The teacher sees the same augmented image, prepared the way it was trained.
            return t_norm(resize_crop(images, t_man) if images.shape[-1] != t_man.resolution else images)

        log(f"distilling from {cfg.teacher} (top-1 {t_man.metrics.get('top1')}), alpha {cfg.kd_alpha}, T {cfg.kd_temperature}")

    # 3) loaders: the sampler's seed + epoch fixes the order on every rank, resumed or not
    if use_device_data(cfg, data, device):
        loader = sampler = DeviceBatches(data.train, cfg.batch_size, device, rank=rank, world=world, seed=cfg.seed,
                                         chunk=cfg.augment_chunk)
    else:
        sampler = DistributedSampler(data.train, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
        loader = DataLoader(data.train, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                            drop_last=len(data.train) // world >= cfg.batch_size, pin_memory=device.type == "cuda",
                            persistent_workers=cfg.workers > 0)  # no re-fork of the workers every epoch
    test_loader = DataLoader(data.test, batch_size=256, shuffle=False, num_workers=cfg.workers)
    # Every choice is made on the validation split; the test split is evaluated once, after the choice.
    chooser = "val" if data.val is not None else "test"
    val_loader = (DataLoader(data.val, batch_size=256, shuffle=False, num_workers=cfg.workers)
                  if data.val is not None else test_loader)
    steps_per_epoch = len(loader)
    # A fractional `epochs` (the quick recipe's 0.75) ends the last pass early; the schedule spans exactly
    # the steps that run.
    total_steps = max(1, round(cfg.epochs * steps_per_epoch))
    n_passes = math.ceil(total_steps / steps_per_epoch)
    warmup_steps = min(int(cfg.warmup_epochs * steps_per_epoch), max(0, total_steps - 1))
    pad = 0 if cfg.data.startswith("imagefolder:") else int(round(cfg.crop_pad * cfg.resolution))

    # 4) resume, or start fresh; after this, each rank draws its own augmentation randomness
    start_epoch, step, recalibrated = 0, 0, False
    if resume:
        meta = load_state(resume, model=net, ema=ema, optimizer=optimizer, scaler=scaler)
        start_epoch, step = meta["epoch"] + 1, meta["step"]
        recalibrated = bool(meta.get("bn_recalibrated"))
        if world > 1:
            seed_everything(cfg.seed + 1000 * (start_epoch) + rank)  # per-rank streams were not saved per rank
        if meta["config"].get("time_budget"):  # the schedule that run fixed, not this run's --epochs
            cfg.epochs = meta["config"]["epochs"]
            total_steps = max(1, round(cfg.epochs * steps_per_epoch))
            n_passes = math.ceil(total_steps / steps_per_epoch)
        exported = meta.get("exported")
        if start_epoch >= n_passes and exported:
            from store import has_checkpoint

            if has_checkpoint(exported):  # storing it again would only add an identical version
                log(f"{resume}: the run already finished and is stored as {exported}; nothing to do")
                dist_utils.cleanup()
                return {"tag": exported, "run_dir": str(run_dir), "already_finished": True}
        log(f"resumed from {resume} after epoch {start_epoch}, step {step}")
    else:
        seed_everything(cfg.seed + rank)
        if main_proc:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / LOG_FILE).write_text("")
    run_dir.mkdir(parents=True, exist_ok=True)
    feed = f"batches augmented on {device.type}" if isinstance(loader, DeviceBatches) else "a DataLoader"
    log(f"{variant} -> {name}: {count_params(net):,} params, {world} process(es) on {device}, global batch "
        f"{global_batch}, peak lr {peak_lr:.2e}, amp {amp_dtype}, {cfg.epochs:g} epoch(s): {total_steps} steps "
        f"of {steps_per_epoch} per epoch, {feed}")

    # 5) epochs
    t_train = time.perf_counter()
    images_seen = 0
    last = {}
    planned = not cfg.time_budget or bool(resume)
    asked_steps = total_steps

    def replan(at_step: int, sec_per_step: float) -> int:
        """--time-budget: fit the schedule to the whole epochs left in the budget, the same on every rank.

        Called once in the first epoch, then after each epoch that ends inside the warmup: until the
        warmup ends the LR does not depend on the total, so the plan can still follow the measured rate
        (processes that share a GPU slow each other down as they start)."""
        nonlocal total_steps, n_passes, planned
        planned = True
        sec = dist_utils.agree(sec_per_step, "max", device)
        # each evaluation of model + EMA costs about 6% of an epoch (20k forward passes vs 60k training steps)
        per_step = sec * (1.03 + (0.06 / cfg.eval_every if cfg.eval_every else 0.0))
        fit = at_step + int((t_train + cfg.time_budget - time.perf_counter()) / per_step)
        whole = fit // steps_per_epoch * steps_per_epoch
        total = asked_steps if fit >= asked_steps else max(at_step, whole or fit)
        total_steps = int(dist_utils.agree(total, "min", device))
        n_passes = math.ceil(total_steps / steps_per_epoch)
        cfg.epochs = total_steps / steps_per_epoch  # what the state, manifest and a resume see
        log(f"time budget {cfg.time_budget:g} s at {1e3 * sec:.1f} ms/step: {cfg.epochs:g} epoch(s), {total_steps} steps")
        return total_steps

    epoch = start_epoch
    while epoch < n_passes:
        sampler.set_epoch(epoch)
        steps_before = step
        stats, step = train_one_epoch(
            model, ema, optimizer, scaler, loader, normalize, cfg, epoch=epoch, step=step, total_steps=total_steps,
            warmup_steps=warmup_steps, device=device, peak_lr=peak_lr, amp_dtype=amp_dtype, teacher=teacher,
            teacher_input=teacher_input, progress=bar, pad=pad,
            heartbeat=100 if main_proc and not bar else 0, max_steps=total_steps - step,
            replan=None if planned else replan,
        )
        images_seen += (step - steps_before) * global_batch
        if cfg.time_budget and not resume and step <= warmup_steps and step < total_steps:
            replan(step, cfg.batch_size / stats["images_per_s_steady"])
        record = {"epoch": epoch + 1, "step": step, **stats, "images_per_s_total": stats["images_per_s"] * world}
        is_last = epoch + 1 == n_passes
        if main_proc and is_last and cfg.bn_recalibrate:
            for m in (net, ema.module):
                recalibrate_bn(m, loader, normalize, cfg.bn_recalibrate, device, cfg.channels_last)
            record["bn_recalibrated_batches"] = min(cfg.bn_recalibrate, steps_per_epoch)
            recalibrated = True
        if main_proc and (is_last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0)):
            last = {
                "model": evaluate(net, val_loader, normalize, manifest.num_classes, device, cfg.channels_last, amp_dtype),
                "ema": evaluate(ema.module, val_loader, normalize, manifest.num_classes, device, cfg.channels_last, amp_dtype),
            }
            record.update({f"{chooser}_{k}": last["model"][k] for k in ("top1", "top5", "loss")})
            record.update({f"ema_{chooser}_{k}": last["ema"][k] for k in ("top1", "top5", "loss")})
        if main_proc:
            append_jsonl(run_dir / LOG_FILE, record)
            log(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
            save_state(run_dir, model=net, ema=ema, optimizer=optimizer, scaler=scaler, epoch=epoch, step=step,
                       config=cfg.to_dict(), extra={"bn_recalibrated": recalibrated})
        dist_utils.barrier()
        if cfg.stop_after_epoch and epoch + 1 == cfg.stop_after_epoch and not is_last:
            log(f"stopped after epoch {epoch + 1} (--stop-after-epoch); continue with --resume {run_dir}")
            dist_utils.cleanup()
            return {"tag": None, "run_dir": str(run_dir), "stopped_after_epoch": epoch + 1}
        epoch += 1
    train_seconds = time.perf_counter() - t_train

    # 6) export the better of the model and its EMA, on rank 0
    digests = dist_utils.weight_digests(net)
    in_sync = all(np.allclose(d, digests[0], rtol=1e-9, atol=0) for d in digests)
    result: dict[str, Any] = {"tag": None, "run_dir": str(run_dir), "ranks_in_sync": in_sync, "digests": digests}
    if main_proc:
        if not last:  # resumed from the state of a finished run: re-export it (recalibrated if it was not)
            if cfg.bn_recalibrate and not recalibrated:
                sampler.set_epoch(n_passes - 1)
                for m in (net, ema.module):
                    recalibrate_bn(m, loader, normalize, cfg.bn_recalibrate, device, cfg.channels_last)
            last = {"model": evaluate(net, val_loader, normalize, manifest.num_classes, device, cfg.channels_last),
                    "ema": evaluate(ema.module, val_loader, normalize, manifest.num_classes, device, cfg.channels_last)}
        pick = "ema" if last["ema"]["top1"] >= last["model"]["top1"] else "model"
        export = ema.module if pick == "ema" else net
        best = (evaluate(export, test_loader, normalize, manifest.num_classes, device, cfg.channels_last, amp_dtype,
                         keep_logits=True) if chooser == "val" else last[pick])  # the test split, once, for the chosen weights
        if chooser == "val":  # scores as calibrated probabilities: a temperature fitted on the validation split
            from .temperature import collect_logits, score_calibration

            val_logits = collect_logits(export, val_loader, normalize, device, cfg.channels_last)
            scores = score_calibration(val_logits, (best.pop("logits"), best.pop("labels")))
            manifest.temperature = scores["temperature"]
        manifest.metrics = {
            "top1": best["top1"], "top5": best["top5"], "loss": best["loss"],
            "per_class": dict(zip(manifest.classes, best["per_class"])), "test_images": best["images"],
            # what chose the weights: top-1 of both on `chosen_on` (val, or test when --val-size is 0)
            "weights": pick, "chosen_on": chooser, "model_top1": last["model"]["top1"], "ema_top1": last["ema"]["top1"],
            "val_top1": last[pick]["top1"] if chooser == "val" else None, "val_images": data.split.get("val_images", 0),
            "val_seed": data.split.get("val_seed"), "val_from": data.split.get("val_from"),
            "score_temperature": scores if chooser == "val" else None,
            "epochs": cfg.epochs, "train_seconds": round(train_seconds, 1),
            "images_per_s": round(images_seen / train_seconds, 1) if images_seen else None,
            "world_size": world, "ranks_in_sync": in_sync,
        }
        manifest.training = {
            **cfg.to_dict(), "name": name, "world_size": world, "global_batch": global_batch, "peak_lr": peak_lr,
            "amp_dtype": str(amp_dtype).replace("torch.", "") if amp_dtype else None, "device": str(device),
            "torch": torch.__version__, "resumed_from": resume,
        }
        export = export.to("cpu", memory_format=torch.contiguous_format)
        manifest.params = count_params(export)
        manifest.macs = count_macs(export, cfg.resolution, in_chans=manifest.in_chans)
        with tempfile.TemporaryDirectory() as tmp:
            png = plot_confusion(best["confusion"], manifest.classes, Path(tmp) / CONFUSION_FILE,
                                 f"{name} ({pick} weights): top-1 {best['top1']:.2%} on {best['images']} {data.dataset} images")
            tag = save_checkpoint(export, manifest, name=name,
                                  extra_files={LOG_FILE: run_dir / LOG_FILE, CONFUSION_FILE: png})
        mark_exported(run_dir, tag)
        result.update(tag=tag, metrics=manifest.metrics)
        log(f"saved {tag}: test top-1 {best['top1']:.2%} top-5 {best['top5']:.2%} ({pick} weights, chosen on {chooser}: "
            f"model {last['model']['top1']:.2%}, EMA {last['ema']['top1']:.2%}), {train_seconds:.0f} s training, "
            f"{manifest.metrics['images_per_s']} images/s")
        if world > 1:
            log(f"ranks in sync: {in_sync} ({digests})")
    dist_utils.barrier()
    dist_utils.cleanup()
    return result


# What a resumed run may change: how it runs and where its checkpoint goes, not what it trains (the
# state's tensors, schedule and data order depend on every other option).


def run(args: argparse.Namespace) -> int:
    """Entry point of `effnet train` and `python -m training`."""
    from . import distributed as dist_utils

    cfg = resume_config(args) if args.resume else config_from_args(args)
    progress = not args.no_progress
    launch = dist_utils.Launch(args.nproc, args.nnodes, args.node_rank, args.rdzv_endpoint)
    name = check_store_name(checkpoint_name(cfg.variant, cfg.data, cfg.name))
    if cfg.init and not args.resume:  # a missing or other-variant --init fails now, not after the data has loaded
        from models import get_variant
        from store import read_manifest

        init_variant = read_manifest(cfg.init)[0].variant
        if init_variant != get_variant(cfg.variant).name:
            raise ValueError(f"--init {cfg.init} holds a {init_variant!r} network, this run trains "
                             f"{get_variant(cfg.variant).name!r} (fine-tune a checkpoint of the same variant)")
    if args.skip_existing:
        from store import has_checkpoint

        if has_checkpoint(f"{name}:latest"):
            print(f"{name}:latest is already in the store; skipped")
            return 0
    if launch.needed and "RANK" not in os.environ:
        return dist_utils.launch_torchrun(launch, cfg.to_dict(), run_dir_for(cfg, name), name, args.resume, progress)
    run_dir = run_dir_for(cfg, name, args.resume)
    state = run_dir / "state.json"
    # Compared as "changed", not "newer than the start": file times come from the kernel's coarse clock,
    # a few ms behind time.time(), so a state written just after the start can look older than it.
    state_before = state.stat().st_mtime_ns if state.is_file() else None

    def stop(signum, frame):
        raise KeyboardInterrupt

    # SIGTERM (kill, a scheduler's stop, docker stop) ends the run as Ctrl-C does, with the message below.
    previous = signal.signal(signal.SIGTERM, stop) if threading.current_thread() is threading.main_thread() else None
    try:
        main(cfg, resume=args.resume, progress=progress)
    except KeyboardInterrupt:
        if state.is_file():  # saved by this run, or (a resumed run stopped early) the one it resumed from
            epoch = json.loads(state.read_text()).get("epoch", -1) + 1
            when = "" if state.stat().st_mtime_ns != state_before else " (no epoch ended in this run)"
            print(f"interrupted: the state after epoch {epoch} is saved in {run_dir}{when}; continue with\n"
                  f"  effnet train --resume {run_dir}", file=sys.stderr)
        else:
            print("interrupted before the first epoch ended: no state was saved, nothing to resume", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0
