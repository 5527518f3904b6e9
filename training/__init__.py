"""Training: `effnet train` turns a registered variant and a dataset into a verified checkpoint in the store.

Modules, one concern each: `config` (every default, with its reason), `data` (datasets as uint8),
`loop` (train_one_epoch, evaluate, LR schedule, EMA, distillation), `state` (resumable state as
safetensors + JSON), `distributed` (torchrun), `report` (epoch log, confusion matrix), `train`
(main, run), `options` (get_args_parser: the flags and their help), `parallel` (train-many),
`pretrained` (`effnet import-pretrained`). The commands themselves are in `cli/training.py`.
"""
from .config import RECIPES, TrainConfig, resolve_config

__all__ = ["RECIPES", "TrainConfig", "resolve_config"]
