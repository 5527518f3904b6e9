"""Name -> variant registry, in the manner of timm's `create_model` / `list_models`.

Every family module registers its variants at import; the CLI, trainer, service and tests reach
every variant through `create_model(name)` and nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .network import EfficientNetVariant, NetConfig


@dataclass(frozen=True)
class VariantInfo:
    name: str
    family: str
    config: NetConfig
    description: str
    # The slides' published figures for this row, where they give one (1000 classes, 224x224).
    seed_params: float | None = None
    seed_macs: float | None = None
    # A constant the slides' paper adds to every parameter row (see the compact family).
    seed_offset: float = 0.0
    pretrained: str | None = None  # where ImageNet weights can come from, if anywhere


_REGISTRY: dict[str, VariantInfo] = {}
_ALIASES: dict[str, str] = {}


def register(info: VariantInfo, aliases: tuple[str, ...] = ()) -> VariantInfo:
    for n in (info.name, *aliases):
        if n in _REGISTRY or n in _ALIASES:
            raise ValueError(f"variant name {n!r} registered twice")
    _REGISTRY[info.name] = info
    for a in aliases:
        _ALIASES[a] = info.name
    return info


def list_models(family: str | None = None) -> list[str]:
    """Canonical names of every registered variant (aliases excluded), in registration order."""
    return [n for n, v in _REGISTRY.items() if family is None or v.family == family]


def list_aliases() -> dict[str, str]:
    return dict(_ALIASES)


def get_variant(name: str) -> VariantInfo:
    name = _ALIASES.get(name, name)
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown variant {name!r}; known variants: {', '.join(list_models())}"
            + (f"; aliases: {', '.join(sorted(_ALIASES))}" if _ALIASES else "")
        ) from None


def model_config(name: str, **overrides: Any) -> NetConfig:
    """The variant's `NetConfig` with network-wide overrides (drop_rate, drop_path_rate, act, ...)."""
    return get_variant(name).config.with_overrides(**overrides)


def create_model(name: str, num_classes: int = 1000, in_chans: int = 3, **overrides: Any) -> nn.Module:
    """Build a registered variant, randomly initialised.

    `overrides` replace fields of the variant's `NetConfig`, e.g. `drop_rate=0.3, drop_path_rate=0.1`.
    """
    return EfficientNetVariant(model_config(name, **overrides), num_classes=num_classes, in_chans=in_chans)


def build_from_config(cfg: NetConfig | dict, num_classes: int, in_chans: int = 3) -> nn.Module:
    """Rebuild a network from a serialised config (what a checkpoint manifest stores)."""
    if isinstance(cfg, dict):
        cfg = NetConfig.from_dict(cfg)
    return EfficientNetVariant(cfg, num_classes=num_classes, in_chans=in_chans)
