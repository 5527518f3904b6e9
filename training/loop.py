"""One epoch of training, evaluation, the LR schedule and the EMA of the weights."""
from __future__ import annotations

import contextlib
import math
import time
from copy import deepcopy

import torch
import torch.nn.functional as F
from torch import nn

from .data import batch_augment


PLAN_STEPS = 50  # steps timed (after the warm-up steps) before a --time-budget run fixes its schedule


def get_lr(step: int, total_steps: int, warmup_steps: int, peak: float, min_ratio: float) -> float:
    """Linear warmup to `peak`, then cosine down to `peak * min_ratio` (a pure function of the step)."""
    # 1) warmup
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    # 2) after the schedule: the floor
    if step >= total_steps:
        return peak * min_ratio
    # 3) cosine in between
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


class ModelEma(nn.Module):
    """Exponential moving average of every state_dict entry (weights and BN statistics), as timm's ModelEmaV2."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        super().__init__()
        self.module = deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.warmup = decay, warmup
        self.updates = 0
        self._pairs: tuple | None = None  # (model, EMA floats, model floats, EMA ints, model ints)

    def current_decay(self) -> float:
        n = self.updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        self.updates += 1
        if self._pairs is None or self._pairs[0] is not model:
            # The state_dict tensors share storage with the parameters and buffers, which training
            # updates in place, so the lists are built once: two state_dict() calls per step cost
            # 2.9 ms of Python for b0, 7% of a GPU step (benchmarks/gpu/README.md).
            ema_f, model_f, ema_i, model_i = [], [], [], []
            for e, m in zip(self.module.state_dict().values(), model.state_dict().values()):
                (ema_f if e.dtype.is_floating_point else ema_i).append(e)
                (model_f if e.dtype.is_floating_point else model_i).append(m.detach())
            self._pairs = (model, ema_f, model_f, ema_i, model_i)
        _, ema_f, model_f, ema_i, model_i = self._pairs
        if ema_i:  # BN's num_batches_tracked: one op instead of 49 copies for b0
            torch._foreach_copy_(ema_i, model_i)
        # One multi-tensor kernel instead of ~300 small ones: on a GPU the per-tensor loop cost as
        # much launch time as a small model's forward pass.
        torch._foreach_lerp_(ema_f, model_f, 1 - d)


def distill_loss(student_logits, teacher_logits, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened distributions, scaled by T^2 (Hinton et al.)."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student_logits / t, -1), F.log_softmax(teacher_logits / t, -1), log_target=True, reduction="batchmean"
    ) * (t * t)


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_one_epoch(
    model, ema, optimizer, scaler, loader, normalize, cfg, *, epoch, step, total_steps, warmup_steps, device,
    peak_lr, amp_dtype=None, teacher=None, teacher_input=None, progress=True, pad=0, heartbeat=0, max_steps=None,
    replan=None,
) -> tuple[dict, int]:
    """Train for one pass over `loader`; returns (metrics, global step after the epoch).

    `normalize` is the manifest's InputNormalizer (uint8 -> model input). With a teacher, the loss is
    (1 - kd_alpha) * label-smoothed CE + kd_alpha * distillation. `max_steps` ends the pass early (the
    last pass of a fractional number of epochs). `replan(step, seconds_per_step)`, if given, is called once
    after `PLAN_STEPS` timed steps (fewer in a short epoch) and returns the new total number of steps.
    """
    from tqdm import tqdm

    model.train()
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    total_loss, total_correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
    t0 = time.perf_counter()
    n_steps = len(loader) if max_steps is None else max(0, min(len(loader), max_steps))
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{math.ceil(cfg.epochs)}", disable=not progress, unit="batch", total=n_steps,
               mininterval=1.0, dynamic_ncols=True, leave=True)
    # The steady rate leaves out the first steps: worker start-up, cuDNN's algorithm search and the
    # allocator's growth make them up to 4x slower on a GPU (benchmarks/gpu/README.md).
    warm_steps, t_warm, seen_warm = max(1, min(20, len(loader) // 5)), None, 0
    step0 = step
    plan_at = min(warm_steps + PLAN_STEPS, n_steps)
    for i, (images, labels) in enumerate(bar):
        if i >= n_steps:
            break
        if i == warm_steps:
            t_warm, seen_warm = time.perf_counter(), seen
        lr = get_lr(step, total_steps, warmup_steps, peak_lr, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images = batch_augment(images, pad, cfg.hflip, cfg.random_erasing)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        x = normalize(images).contiguous(memory_format=memory_format)
        with autocast_context(device, amp_dtype):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(teacher_input(images).contiguous(memory_format=memory_format)).float()
                loss = (1 - cfg.kd_alpha) * loss + cfg.kd_alpha * distill_loss(logits.float(), t_logits, cfg.kd_temperature)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.clip_grad > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        ema.update(model.module if hasattr(model, "module") else model)
        step += 1
        n = labels.shape[0]
        seen += n
        total_loss += loss.detach() * n
        total_correct += (logits.detach().argmax(-1) == labels).sum()
        if replan is not None and t_warm is not None and i + 1 == plan_at:
            float(total_loss)  # waits for the device: the timed steps are done, not just queued
            total_steps = replan(step, (time.perf_counter() - t_warm) / (i + 1 - warm_steps))
            n_steps = min(n_steps, total_steps - step0)
        if progress and (i % cfg.log_every == 0 or i == n_steps - 1):
            dt = time.perf_counter() - t0
            bar.set_postfix(loss=f"{float(total_loss) / seen:.3f}", img_s=f"{seen / dt:.0f}", lr=f"{lr:.2e}", refresh=False)
        elif heartbeat and (i + 1) % heartbeat == 0:
            # Without a bar (logs, make): one line now and then, with the same figures.
            dt = time.perf_counter() - t0
            eta = dt / (i + 1) * (n_steps - i - 1)
            print(f"  epoch {epoch + 1} step {i + 1}/{n_steps} loss {float(total_loss) / seen:.3f} "
                  f"{seen / dt:.0f} img/s lr {lr:.2e} eta {eta:.0f} s", flush=True)
    bar.close()
    t1 = time.perf_counter()
    dt = t1 - t0
    return {
        "train_loss": float(total_loss) / max(1, seen),
        "train_acc": float(total_correct) / max(1, seen),
        "images_per_s": seen / dt,  # this process; multiply by the world size for the job
        # after the first steps (the rate to plan with); the whole epoch's rate when it is too short
        "images_per_s_steady": (seen - seen_warm) / (t1 - t_warm) if t_warm and t1 > t_warm else seen / dt,
        "epoch_seconds": dt,
        "lr": lr,
    }, step


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader, normalize, batches: int, device, channels_last: bool = True) -> int:
    """Recompute every BatchNorm's running statistics for the current weights (PreciseBN).

    Only the BN layers run in training mode, with a cumulative average (momentum None) over `batches`
    training batches; dropout and stochastic depth stay off, as at evaluation. Returns the batches used.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or batches <= 0:
        return 0
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    momenta = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    n = 0
    for images, _ in loader:
        model(normalize(images.to(device)).contiguous(memory_format=memory_format))
        n += 1
        if n >= batches:
            break
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    model.eval()
    return n


@torch.no_grad()
def evaluate(model, loader, normalize, num_classes: int, device, channels_last: bool = True, amp_dtype=None,
             keep_logits: bool = False) -> dict:
    """Top-1, top-5, per-class accuracy and the confusion matrix (rows: true class, columns: predicted);
    with `keep_logits`, also "logits" and "labels" (CPU tensors) for score calibration."""
    model.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    top5_hits, total, loss_sum = 0, 0, 0.0
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    k = min(5, num_classes)
    t0 = time.perf_counter()
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with autocast_context(device, amp_dtype):
            logits = model(normalize(images).contiguous(memory_format=memory_format)).float()
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        pred = logits.argmax(-1)
        if keep_logits:
            kept.append((logits.cpu(), labels.cpu()))
        confusion += torch.bincount((labels * num_classes + pred).cpu(), minlength=num_classes**2).view(num_classes, -1)
        top5_hits += int((logits.topk(k, -1).indices == labels[:, None]).any(-1).sum())
        total += labels.shape[0]
    # None, not 0.0, for a class without test images: it was not measured, not always missed.
    per_class = [float(hit) / n if n else None for hit, n in zip(confusion.diag().tolist(), confusion.sum(1).tolist())]
    out = {"logits": torch.cat([x for x, _ in kept]), "labels": torch.cat([y for _, y in kept])} if kept else {}
    return {
        **out,
        "top1": float(confusion.diag().sum()) / max(1, total),
        "top5": top5_hits / max(1, total),
        "loss": loss_sum / max(1, total),
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "images": total,
        "eval_seconds": time.perf_counter() - t0,
    }
