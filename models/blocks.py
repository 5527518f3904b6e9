"""One class per block type. The row's `block` field names the class (see `BLOCKS`).

Every block takes the same arguments: a resolved `LayerCfg` plus the network's activation and norm
factories, so the network builder never branches on the block type.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .layers import ConvBNAct, SqueezeExcite

SE_PLACES = ("dw", "end")  # after the depthwise conv (B0) or after the last 1x1 conv (SEend)


@dataclass(frozen=True)
class LayerCfg:
    """One block instance, resolved from a stage row: the block builders read only this."""

    in_ch: int
    out_ch: int
    kernel: int
    stride: int
    width: int  # inner channel count (expanded width for MBConv, the equal width for MEC)
    se: str | None  # None, "dw" or "end"
    se_ch: int  # squeeze width of the SE module
    drop_path: float

    @property
    def has_skip(self) -> bool:
        return self.stride == 1 and self.in_ch == self.out_ch


class StochasticDepth(nn.Module):
    """torchvision.ops.StochasticDepth in "row" mode: the same arithmetic and the same random draws.

    Ours rather than torchvision's: importing torchvision.ops imports torch._dynamo, about 2 s of CPU
    in every worker process's start, for a few lines of arithmetic. tests/models/ checks it against
    torchvision's.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"drop probability has to be between 0 and 1, but got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        survival = 1.0 - self.p
        noise = torch.empty([x.shape[0]] + [1] * (x.ndim - 1), dtype=x.dtype, device=x.device).bernoulli_(survival)
        if survival > 0.0:
            noise.div_(survival)
        return x * noise

    def extra_repr(self) -> str:
        return f"p={self.p}, mode=row"


Norm = Callable[[int], nn.Module]
Act = Callable[..., nn.Module]


class _Residual(nn.Module):
    """Adds the identity path when shapes allow, with stochastic depth on the block's branch."""

    def _init_skip(self, cfg: LayerCfg) -> None:
        self.use_skip = cfg.has_skip
        self.drop_path = StochasticDepth(cfg.drop_path) if self.use_skip else nn.Identity()

    def _finish(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(y) if self.use_skip else y


class MBConv(_Residual):
    """Mobile inverted bottleneck: 1x1 expand, kxk depthwise, SE (after dw or at the end), 1x1 project."""

    def __init__(self, cfg: LayerCfg, act: Act, norm: Norm) -> None:
        super().__init__()
        w = cfg.width
        # expand
        self.conv_pw = ConvBNAct(cfg.in_ch, w, 1, norm=norm, act=act) if w != cfg.in_ch else nn.Identity()
        # depthwise
        self.conv_dw = ConvBNAct(w, w, cfg.kernel, cfg.stride, groups=w, norm=norm, act=act)
        self.se_dw = SqueezeExcite(w, cfg.se_ch, act) if cfg.se == "dw" else nn.Identity()
        # project
        self.conv_pwl = ConvBNAct(w, cfg.out_ch, 1, norm=norm, act=None)
        self.se_end = SqueezeExcite(cfg.out_ch, cfg.se_ch, act) if cfg.se == "end" else nn.Identity()
        self._init_skip(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_pw(x)
        y = self.conv_dw(y)
        y = self.se_dw(y)
        y = self.conv_pwl(y)
        y = self.se_end(y)
        return self._finish(x, y)


class MEC(_Residual):
    """Mobile Equal channel Convolution: three 1x1 and two kxk depthwise convs, all `width` wide,
    SE after the second depthwise conv (the slides' figure)."""

    def __init__(self, cfg: LayerCfg, act: Act, norm: Norm) -> None:
        super().__init__()
        w = cfg.width
        self.conv_pw = ConvBNAct(cfg.in_ch, w, 1, norm=norm, act=act)
        self.conv_dw = ConvBNAct(w, w, cfg.kernel, cfg.stride, groups=w, norm=norm, act=act)
        self.conv_mid = ConvBNAct(w, w, 1, norm=norm, act=act)
        self.conv_dw2 = ConvBNAct(w, w, cfg.kernel, 1, groups=w, norm=norm, act=act)
        self.se = SqueezeExcite(w, cfg.se_ch, act) if cfg.se is not None else nn.Identity()
        self.conv_pwl = ConvBNAct(w, cfg.out_ch, 1, norm=norm, act=None)
        self._init_skip(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_pw(x)
        y = self.conv_dw(y)
        y = self.conv_mid(y)
        y = self.conv_dw2(y)
        y = self.se(y)
        y = self.conv_pwl(y)
        return self._finish(x, y)


class Conv31(_Residual):
    """Compact paper's Conv31: a full kxk conv then a 1x1 conv (no depthwise).

    NOTE: the slides do not say whether Conv31 keeps the residual of the MBConv block it replaces;
    parameters and MACs are the same either way. We keep it where shapes allow (it replaces a skip
    block at 56x56), which trains more easily; the last 1x1 is linear like MBConv's projection.
    """

    def __init__(self, cfg: LayerCfg, act: Act, norm: Norm) -> None:
        super().__init__()
        self.conv = ConvBNAct(cfg.in_ch, cfg.out_ch, cfg.kernel, cfg.stride, norm=norm, act=act)
        self.conv_pwl = ConvBNAct(cfg.out_ch, cfg.out_ch, 1, norm=norm, act=None)
        self._init_skip(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._finish(x, self.conv_pwl(self.conv(x)))


class Conv131(_Residual):
    """Compact paper's Conv131: 1x1 in->width, kxk width->width, 1x1 width->out.

    NOTE: the slides do not give Conv131's inner width. width = input channels (24) reproduces the
    slides' stage-3 MAC difference Conv131 - Remove = -5.87M (we get -5.87M).
    """

    def __init__(self, cfg: LayerCfg, act: Act, norm: Norm) -> None:
        super().__init__()
        w = cfg.width
        self.conv_pw = ConvBNAct(cfg.in_ch, w, 1, norm=norm, act=act)
        self.conv = ConvBNAct(w, w, cfg.kernel, cfg.stride, norm=norm, act=act)
        self.conv_pwl = ConvBNAct(w, cfg.out_ch, 1, norm=norm, act=None)
        self._init_skip(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._finish(x, self.conv_pwl(self.conv(self.conv_pw(x))))


class PlainConv(nn.Module):
    """A single kxk conv + BN + activation (the stage-2 `Conv3x3` / `Conv1x1` ablations)."""

    def __init__(self, cfg: LayerCfg, act: Act, norm: Norm) -> None:
        super().__init__()
        self.conv = ConvBNAct(cfg.in_ch, cfg.out_ch, cfg.kernel, cfg.stride, norm=norm, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class DWConv(nn.Module):
    """A single kxk depthwise conv + BN + activation (the stage-2 `DWConv3x3` ablation).

    Channels cannot change in a depthwise conv, so out_ch must equal in_ch.
    """

    def __init__(self, cfg: LayerCfg, act: Act, norm: Norm) -> None:
        super().__init__()
        if cfg.out_ch != cfg.in_ch:
            raise ValueError(f"DWConv keeps its channels; got {cfg.in_ch} -> {cfg.out_ch}")
        self.conv = ConvBNAct(cfg.in_ch, cfg.in_ch, cfg.kernel, cfg.stride, groups=cfg.in_ch, norm=norm, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


BLOCKS: dict[str, type[nn.Module]] = {
    "mbconv": MBConv,
    "mec": MEC,
    "conv31": Conv31,
    "conv131": Conv131,
    "conv": PlainConv,
    "dwconv": DWConv,
}
