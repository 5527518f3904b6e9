"""Cross-cutting layers shared by every block: conv+norm+activation and squeeze-excitation."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

ACTIVATIONS: dict[str, Callable[..., nn.Module]] = {
    "silu": nn.SiLU,
    "relu6": nn.ReLU6,
    "relu": nn.ReLU,
}


def get_activation(name: str) -> Callable[..., nn.Module]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


class ConvBNAct(nn.Sequential):
    """kxk convolution, BatchNorm, optional activation; `same`-style symmetric padding."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int = 1,
        stride: int = 1,
        groups: int = 1,
        *,
        norm: Callable[[int], nn.Module],
        act: Callable[..., nn.Module] | None,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False)
        self.bn = norm(out_ch)
        self.act = act(inplace=True) if act is not None else nn.Identity()


class SqueezeExcite(nn.Module):
    """Global pool -> 1x1 reduce -> act -> 1x1 expand -> sigmoid gate (the slides' SE module)."""

    def __init__(self, channels: int, squeeze: int, act: Callable[..., nn.Module]) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.act = act(inplace=True)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)  # faster than mean() on channels_last tensors (benchmarks/bench-eager.md)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))
