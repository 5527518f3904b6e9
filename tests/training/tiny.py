"""The smallest training runs that still exercise every part: fake data, 32x32, 2 steps of 16 images per epoch."""
from pathlib import Path

from training import TrainConfig, resolve_config

ROOT = Path(__file__).resolve().parents[2]
# `effnet train` options of a tiny run.
TINY = ["--data", "fake", "--resolution", "32", "--batch-size", "16", "--limit-train", "32", "--no-progress"]


def tiny_cfg(tmp: Path, **kw) -> TrainConfig:
    """A tiny run's configuration, its state and log in `tmp`."""
    base = dict(variant="compact", data="fake", resolution=32, batch_size=16, limit_train=32, epochs=2,
                warmup_epochs=0.5, run_dir=str(tmp))
    return resolve_config({**base, **kw})
