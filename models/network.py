"""The network shared by every family: stem, stages built from row tables, head, classifier.

A variant is a `NetConfig`: a tuple of `Row`s (one per stage, as in the slides' tables) plus
network-wide options (activation, SE placement policy, norm). Nothing here knows variant names.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from typing import Any

import torch
from torch import nn

from .blocks import BLOCKS, SE_PLACES, LayerCfg
from .layers import ConvBNAct, get_activation

SE_BLOCKS = ("mbconv", "mec")  # block types that can carry an SE module


@dataclass(frozen=True)
class Row:
    """One stage of a table: `layers` blocks of type `block`; the first one strides and changes width."""

    block: str
    kernel: int
    stride: int
    in_ch: int
    out_ch: int
    layers: int = 1
    expand: float = 1.0  # inner width = round(expand * in_ch) ...
    width: int | None = None  # ... unless given here explicitly
    se: bool = True  # False: never an SE here, whatever the network's SE policy

    def __post_init__(self) -> None:
        if self.block not in BLOCKS:
            raise ValueError(f"unknown block {self.block!r}; known: {sorted(BLOCKS)}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel must be odd and positive, got {self.kernel}")
        if self.stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {self.stride}")
        if min(self.in_ch, self.out_ch, self.layers) < 1 or self.expand <= 0:
            raise ValueError(f"channels, layers and expand must be positive: {self}")
        if self.se and self.block not in SE_BLOCKS:
            raise ValueError(f"block {self.block!r} cannot carry SE; set se=False")

    def inner_width(self, in_ch: int) -> int:
        return self.width if self.width is not None else int(round(self.expand * in_ch))


@dataclass(frozen=True)
class NetConfig:
    rows: tuple[Row, ...]
    stem_ch: int = 32
    head_ch: int = 1280
    act: str = "silu"
    # SE placement per block kind: "dw" (B0), "end" (SEend) or None (noSE).
    se_noskip: str | None = "dw"
    se_hasskip: str | None = "dw"
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1
    drop_rate: float = 0.2  # dropout before the classifier (B0's value)
    drop_path_rate: float = 0.2  # stochastic depth of the last block, linear from 0 (B0's value)

    def __post_init__(self) -> None:
        for place in (self.se_noskip, self.se_hasskip):
            if place is not None and place not in SE_PLACES:
                raise ValueError(f"SE placement must be one of {SE_PLACES} or None, got {place!r}")
        get_activation(self.act)
        if self.rows and self.rows[0].in_ch != self.stem_ch:
            raise ValueError(f"first row takes {self.rows[0].in_ch} channels but the stem gives {self.stem_ch}")
        for a, b in zip(self.rows, self.rows[1:]):
            if a.out_ch != b.in_ch:
                raise ValueError(f"row {b} takes {b.in_ch} channels but the row before gives {a.out_ch}")
        if not (0 <= self.drop_rate < 1 and 0 <= self.drop_path_rate < 1):
            raise ValueError("drop_rate and drop_path_rate must be in [0, 1)")

    def layers(self) -> list[LayerCfg]:
        """Expand rows into one `LayerCfg` per block, resolving skip, SE and stochastic depth."""
        total = sum(r.layers for r in self.rows)
        out: list[LayerCfg] = []
        for row in self.rows:
            for j in range(row.layers):
                in_ch = row.in_ch if j == 0 else row.out_ch
                stride = row.stride if j == 0 else 1
                has_skip = stride == 1 and in_ch == row.out_ch
                se = (self.se_hasskip if has_skip else self.se_noskip) if row.se else None
                out.append(
                    LayerCfg(
                        in_ch=in_ch,
                        out_ch=row.out_ch,
                        kernel=row.kernel,
                        stride=stride,
                        width=row.inner_width(in_ch),
                        se=se,
                        # B0 squeezes to a quarter of the block's *input* channels, wherever SE sits.
                        se_ch=max(1, in_ch // 4),
                        drop_path=self.drop_path_rate * len(out) / total,
                    )
                )
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "NetConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown NetConfig keys {sorted(unknown)}")
        d = dict(d)
        d["rows"] = tuple(Row(**r) for r in d["rows"])
        return cls(**d)

    def with_overrides(self, **overrides: Any) -> "NetConfig":
        return replace(self, **overrides) if overrides else self


class EfficientNetVariant(nn.Module):
    """Stem conv -> stages of blocks -> 1x1 head conv -> global pool -> dropout -> linear.

    Works at any input resolution from 32x32 up (global average pooling before the classifier).
    """

    def __init__(self, cfg: NetConfig, num_classes: int = 1000, in_chans: int = 3) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.in_chans = in_chans
        act = get_activation(cfg.act)
        norm = partial(nn.BatchNorm2d, eps=cfg.bn_eps, momentum=cfg.bn_momentum)

        self.stem = ConvBNAct(in_chans, cfg.stem_ch, 3, 2, norm=norm, act=act)
        layer_cfgs = iter(cfg.layers())
        stages = []
        for row in cfg.rows:
            block = BLOCKS[row.block]
            stages.append(nn.Sequential(*(block(next(layer_cfgs), act, norm) for _ in range(row.layers))))
        self.blocks = nn.Sequential(*stages)
        last = cfg.rows[-1].out_ch if cfg.rows else cfg.stem_ch
        self.head = ConvBNAct(last, cfg.head_ch, 1, norm=norm, act=act)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(cfg.drop_rate, inplace=True)
        self.classifier = nn.Linear(cfg.head_ch, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's EfficientNet initialisation, so our b0 trains like theirs.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                r = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -r, r)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.forward_features(x)).flatten(1)
        return self.classifier(self.dropout(x))
