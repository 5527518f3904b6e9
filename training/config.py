"""Every training default in one place, each with the reason for its value (nanoGPT style).

`TrainConfig` holds the base values (the "full" recipe, scaled to Fashion-MNIST and ImageNet-like
data); `RECIPES["quick"]` overrides what the 20-minute, 2-CPU-core budget forces. Precedence, lowest
first: TrainConfig defaults < recipe < YAML file (-c) < command-line flags. The resolved config is
saved in every checkpoint's manifest (`manifest.training`) and in the run folder.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any


@dataclass
class TrainConfig:
    # what
    variant: str = "b0"
    data: str = "fashion-mnist"  # fashion-mnist | imagefolder:PATH | fake
    recipe: str = "full"
    name: str = ""  # store name; "" -> "{canonical variant}-{dataset}", what the service asks for
    teacher: str = ""  # store tag of a teacher checkpoint for knowledge distillation; "" -> none
    init: str = ""  # store tag whose weights start the run (fine-tuning, training/finetune.py); "" -> random
    # schedule
    epochs: float = 40.0  # Fashion-MNIST keeps improving to ~40 epochs with RandAugment; ImageNet users set 350.
    # A fraction is allowed (0.8: the cosine schedule over 80% of one epoch's steps), for budgets below one epoch.
    batch_size: int = 128  # per process; the fastest per image on a CPU: 625 vs 587 img/s at 256 (benchmarks/training-quick.md)
    lr: float = 2e-3  # AdamW peak LR for a global batch of 128; scaled linearly with the global batch
    min_lr_ratio: float = 0.01  # cosine floor: the last epochs still move a little, as in timm
    warmup_epochs: float = 2.0  # BN-heavy nets diverge at full LR from random init; 2 epochs of linear warmup
    weight_decay: float = 0.05  # AdamW decoupled decay, the usual value for conv nets under AdamW; none on BN/bias
    clip_grad: float = 2.0  # max global grad norm: cuts the rare spike at peak LR, inactive otherwise; 0 -> off
    # regularisation
    label_smoothing: float = 0.1  # the EfficientNet paper's value
    drop_rate: float = 0.2  # dropout before the classifier, B0's value
    drop_path_rate: float = 0.1  # stochastic depth; B0 uses 0.2 on ImageNet, a 60k-image set needs less at 40 epochs
    auto_augment: str = "randaugment"  # randaugment | autoaugment | trivialaugment | none (torchvision, uint8 tensors)
    randaugment_magnitude: int = 9  # timm's rand-m9 for B0
    crop_pad: float = 0.125  # random translation of up to 1/8 of the side (4 px at 32), batched on tensors
    hflip: bool = True  # clothing is left-right symmetric; ImageNet too
    random_erasing: float = 0.1  # probability; the WRN + random erasing row of the Fashion-MNIST table
    ema_decay: float = 0.9998  # per step: a horizon of ~5k steps = ~10 epochs of 469 steps; timm's B0 value
    bn_recalibrate: int = 50  # batches of PreciseBN after the last epoch, for the model and its EMA: the
    # running statistics are otherwise a lagging average over weights that kept changing (compact/lite
    # use BN momentum 0.01, a ~100-step horizon; compact after 40 steps: 8.7% -> 44.9% top-1). 0 -> off
    ema_warmup: bool = True  # decay ramps (1+n)/(10+n) so the early, random weights are forgotten fast
    # knowledge distillation (only with --teacher)
    kd_alpha: float = 0.5  # weight of the teacher's soft targets; the rest is the smoothed hard label loss
    kd_temperature: float = 2.0  # softens both distributions so the teacher's ranking of wrong classes counts
    # input
    resolution: int = 64  # 28x28 Fashion-MNIST upsampled; at 32 the 32x downsampling leaves a 1x1 map
    # how
    amp: str = "auto"  # auto | off | bf16 | fp16; auto: off on CPU (bf16 autocast trains slower there: 321 vs 587
    # img/s, benchmarks/training-quick.md), bf16 on CUDA that supports it, else fp16 with a GradScaler
    channels_last: bool = True  # 4.8x faster training on a CPU (benchmarks/training-quick.md); also the GPU fast path
    workers: int = 0  # DataLoader workers; 0 on 2 cores (a worker competes with the 2 compute threads)
    device_data: str = "auto"  # auto | on | off: keep an in-memory training set (fashion-mnist, fake) on the
    # training device and augment it there (training/data.py DeviceBatches). auto: on with CUDA, where CPU
    # workers starve the GPU (benchmarks/gpu/README.md); off on a CPU, where it is the same work.
    augment_chunk: int = 16  # with device_data: images that share one draw of the augmentation policy
    threads: int = 0  # torch threads per process; 0 -> cores / processes, never oversubscribed
    seed: int = 0  # seeds python, numpy, torch and the sampler: a rerun gives the same weights on the same machine
    deterministic: bool = False  # cudnn/algorithms deterministic on CUDA (slower); CPU kernels are already
    eval_every: int = 1  # evaluate model and EMA every N epochs (and always after the last)
    time_budget: float = 0.0  # seconds for the epochs; 0 -> off. After ~50 timed steps the schedule is cut to the
    # whole epochs that fit (`epochs` stays the upper bound): a time-boxed run still ends its cosine schedule,
    # where stopping a 40-epoch schedule early would leave the LR high and the EMA behind.
    log_every: int = 20  # progress-bar refresh in steps
    # where
    run_dir: str = ""  # training state for --resume; "" -> $BENTOML_HOME/runs/{name}
    stop_after_epoch: int = 0  # stop (state saved, no export) after this epoch: simulates an interruption; 0 -> off
    limit_train: int = 0  # use only the first N training images (smoke tests); 0 -> all
    limit_test: int = 0  # use only the first N test (and validation) images; 0 -> all
    # Held out of the training images to make every choice on (EMA or model weights): a count (>= 1), a
    # fraction (< 1), 0 (none: the choices fall to the test split), or -1: 5,000 of Fashion-MNIST's 60,000,
    # a tenth of an image folder's train/ (training/data.py AUTO_VAL_SIZE).
    val_size: float = -1.0
    val_seed: int = 0  # draws the validation split; apart from `seed`, so every run chooses on the same images
    sync_bn: bool = False  # SyncBatchNorm across processes; worth it only for tiny per-GPU batches
    dist_backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


RECIPES: dict[str, dict[str, Any]] = {
    "full": {},
    # The 2-core budget: ~6 minutes per model including evaluation. Per unit of compute a larger
    # input beats more epochs (1 epoch at 64 > 2 epochs at 32), and at 2-3 epochs every regulariser
    # costs accuracy rather than buying it, so they are turned down (benchmarks/training-quick.md).
    "quick": {
        # NOTE: 0.75 of an epoch, not 1 or 2: the three models side by side in ~17 min on 2 cores at
        # 86-88% top-1 (benchmarks/training-quick.md).
        "epochs": 0.75,
        "resolution": 40,  # NOTE: a 2x2 final map instead of 32's 1x1, at 1.56x the cost of 32
        "warmup_epochs": 0.2,  # a 1-epoch run cannot spend much of it warming up
        "lr": 3e-3,  # short cosine schedules want a higher peak
        "drop_path_rate": 0.05,  # underfitting regime: little regularisation
        "drop_rate": 0.1,
        "auto_augment": "none",  # RandAugment pays off after ~10 epochs; here flips only (see crop_pad)
        "random_erasing": 0.0,
        # NOTE: no translation: the base 0.125 costs ~4 points in one epoch, b0 87.5% vs 83.0%
        # (benchmarks/training-quick.md, "Tuning").
        "crop_pad": 0.0,
        "ema_decay": 0.995,  # horizon ~200 steps of the ~470: averages the low-LR tail only
        "eval_every": 0,  # only the final evaluation (each costs ~15 s)
    },
}


def config_fields() -> dict[str, Any]:
    return {f.name: f for f in fields(TrainConfig)}


# Former option names -> their names now: YAML files, training states and `--limit-val` that use the
# former name still work. The evaluation split is Fashion-MNIST's (or the imagefolder's val/) test set.
RENAMED: dict[str, str] = {"limit_val": "limit_test"}


def current_names(values: dict[str, Any]) -> dict[str, Any]:
    """`values` with former option names (RENAMED) under their names now; a value given under both is refused."""
    out = dict(values)
    for old, new in RENAMED.items():
        if old in out:
            if new in out and out[new] is not None and out[old] is not None and out[new] != out[old]:
                raise ValueError(f"--{old.replace('_', '-')} is the former name of --{new.replace('_', '-')}: "
                                 "give one of them")
            value = out.pop(old)
            if out.get(new) is None:
                out[new] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML ({' '.join(str(e).split())}): fix it, e.g. `epochs: 10`, "
                         "one option: value per line") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option: value")
    known = config_fields()
    data = current_names({k.replace("-", "_"): v for k, v in data.items()})
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{path}: unknown options {unknown}; known: {sorted(known)}")
    return data


# Interval per numeric option, as "[0, 1)" reads: a value outside is refused before the data loads,
# rather than training anyway (a label smoothing of 2) or failing after start-up (log_every 0).
BOUNDS: dict[str, str] = {
    "epochs": "(0, 100000]", "batch_size": "[1, 65536]", "lr": "(0, 10]", "min_lr_ratio": "[0, 1]",
    "warmup_epochs": "[0, 100000]", "weight_decay": "[0, 10]", "clip_grad": "[0, 1e9]",
    "label_smoothing": "[0, 1)", "drop_rate": "[0, 1)", "drop_path_rate": "[0, 1)",
    "randaugment_magnitude": "[0, 30]", "crop_pad": "[0, 0.5]", "random_erasing": "[0, 1]",
    "ema_decay": "[0, 1)", "bn_recalibrate": "[0, 100000]", "kd_alpha": "[0, 1]", "kd_temperature": "(0, 100]",
    # below 16 pixels the five stride-2 stages leave less than one pixel; above 1024 is no longer this recipe
    "resolution": "[16, 1024]",
    "workers": "[0, 256]", "augment_chunk": "[1, 65536]", "threads": "[0, 1024]", "eval_every": "[0, 100000]",
    "time_budget": "[0, 1e9]", "log_every": "[1, 1e6]", "stop_after_epoch": "[0, 100000]",
    "limit_train": "[0, 1e9]", "limit_test": "[0, 1e9]", "val_size": "[-1, 1e9]",
}


def check_bounds(cfg: "TrainConfig") -> None:
    """Raise ValueError naming the first option outside BOUNDS (the option as typed on the command line)."""
    for name, interval in BOUNDS.items():
        value, option = getattr(cfg, name), "--" + name.replace("_", "-")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
            raise ValueError(f"{option} must be a number in {interval}, got {value!r}")
        lo, hi = (float(x) for x in interval[1:-1].split(","))
        above = lo <= value if interval[0] == "[" else lo < value
        below = value <= hi if interval[-1] == "]" else value < hi
        if not (above and below):
            raise ValueError(f"{option} must be in {interval}, got {value!r}")


def check_types(cfg: "TrainConfig") -> None:
    """Raise ValueError naming the first option whose value is not of its default's type (-c files).

    YAML gives `hflip: "no"` as a string, which is true in Python, and `name: 123` as an int, which
    failed later with a traceback. Numbers are BOUNDS' concern (check_bounds words those).
    """
    for f in fields(TrainConfig):
        if f.name in BOUNDS:
            continue
        value, option = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool) and not isinstance(value, bool):
            raise ValueError(f"{option} must be true or false (unquoted in YAML), got {value!r}")
        if isinstance(f.default, str) and not isinstance(value, str):
            raise ValueError(f"{option} must be a string (quote it in YAML), got {value!r}")
        if type(f.default) in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{option} must be a number, got {value!r}")


def resolve_config(cli: dict[str, Any], config_file: str | None = None) -> TrainConfig:
    """TrainConfig defaults < recipe < YAML file < explicit command-line values (not None)."""
    from_file = load_yaml(config_file) if config_file else {}
    explicit = {k: v for k, v in current_names(cli).items() if v is not None and k in config_fields()}
    recipe = explicit.get("recipe") or from_file.get("recipe") or TrainConfig.recipe
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; known: {sorted(RECIPES)}")
    values = {**RECIPES[recipe], **from_file, **explicit, "recipe": recipe}
    cfg = TrainConfig(**values)
    check_types(cfg)
    if cfg.auto_augment not in ("randaugment", "autoaugment", "trivialaugment", "none"):
        raise ValueError(f"auto_augment must be randaugment, autoaugment, trivialaugment or none, got {cfg.auto_augment!r}")
    if not (isinstance(cfg.epochs, (int, float)) and cfg.epochs > 0):
        raise ValueError(f"--epochs must be above 0 (fractions allowed, e.g. 0.8), got {cfg.epochs!r}")
    check_bounds(cfg)
    if cfg.device_data not in ("auto", "on", "off"):
        raise ValueError(f"device_data must be auto, on or off, got {cfg.device_data!r}")
    if cfg.amp not in ("auto", "off", "bf16", "fp16"):
        raise ValueError(f"amp must be auto, off, bf16 or fp16, got {cfg.amp!r}")
    return cfg
