"""Parameter and multiply-add counts, as the slides count them."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, resolution: int = 224, in_chans: int | None = None) -> int:
    """Multiply-adds of one image's forward pass (FlopCounterMode flops / 2).

    Counts convolutions and the classifier; like the slides' FLOPS columns it leaves out SE's
    pooling and gating multiplications and elementwise ops (about 4.6M for B0).
    """
    in_chans = in_chans or getattr(model, "in_chans", 3)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, in_chans, resolution, resolution))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
