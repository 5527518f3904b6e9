"""The one definition of how an image becomes a model input, read from a checkpoint's manifest.

Two steps, so the request path can carry small uint8 tensors and normalise inside the model graph:
1. `resize_crop` (uint8 -> uint8): resize the shorter side to `manifest.resize` (default: the
   resolution), centre-crop `resolution x resolution`. Runs where the image is decoded.
2. `InputNormalizer` (uint8 -> float, an nn.Module): scale to 0..1, convert channels to what the
   model was trained on (gray <-> RGB, luma as PIL's convert("L")), then (x - mean) / std. Runs in
   front of the network, inside every engine and exported graph.
Training evaluation, the service and the load-test's offline check all use these, so an image gives
the same logits everywhere.
"""
from __future__ import annotations

import torch
from torch import nn

from .checkpoint import Manifest

# ITU-R 601-2 luma, as PIL's convert("L").
LUMA = (0.299, 0.587, 0.114)

# The centre crop keeps at most `resolution / resize` (<= 1) of the shorter side's length along the
# longer side, so beyond an aspect ratio of 4:1 the rest of the longer side is cut before resizing.
# Without the cut a valid 20000x1 PNG of 100 bytes becomes a 256 x 5,120,000 image (10 GB, 44 s of
# CPU). Images up to 4:1, every ordinary photo, are resized without a cut.
MAX_ASPECT = 4


def trim_long_side(x: torch.Tensor) -> torch.Tensor:
    """(..., H, W) -> the central part of the longer side, at most MAX_ASPECT x the shorter side."""
    h, w = x.shape[-2:]
    keep = MAX_ASPECT * min(h, w)
    if h > keep:
        top = (h - keep) // 2
        x = x[..., top:top + keep, :]
    elif w > keep:
        left = (w - keep) // 2
        x = x[..., left:left + keep]
    return x


def resize_crop(images: torch.Tensor, manifest: Manifest) -> torch.Tensor:
    """uint8 (C,H,W) or (N,C,H,W), C in {1,3} -> uint8 (N,C,R,R) at the manifest's resolution."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    x = images if images.dim() == 4 else images.unsqueeze(0)
    if x.shape[1] not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels, got {x.shape[1]}")
    r = manifest.resolution
    if x.shape[-2:] != (r, r):
        # Imported here: `import torchvision` costs about 2 s (it imports torch._dynamo), and the workers,
        # which import this module but never resize, should not pay it at every start.
        from torchvision.transforms.v2 import functional as F

        x = F.resize(trim_long_side(x), [manifest.resize or r], antialias=True)
        x = F.center_crop(x, [r, r])
    return x


class InputNormalizer(nn.Module):
    """uint8 (N,1|3,R,R) -> normalised float (N,in_chans,R,R), as the checkpoint was trained."""

    def __init__(self, manifest: Manifest) -> None:
        super().__init__()
        c = manifest.in_chans
        self.gray = bool(manifest.grayscale)
        self.in_chans = c
        self.register_buffer("luma", torch.tensor(LUMA).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("mean", torch.tensor(manifest.mean[:c]).view(1, c, 1, 1) * 255, persistent=False)
        self.register_buffer("inv_std", 1 / (torch.tensor(manifest.std[:c]).view(1, c, 1, 1) * 255), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.shape[1] == 3 and (self.gray or self.in_chans == 1):
            x = (x * self.luma).sum(1, keepdim=True)
        if x.shape[1] != self.in_chans:
            x = x.expand(-1, self.in_chans, -1, -1)
        return (x - self.mean) * self.inv_std


def to_model_input(images: torch.Tensor, manifest: Manifest) -> torch.Tensor:
    """uint8 images -> the float tensor the network takes (both steps above)."""
    return InputNormalizer(manifest)(resize_crop(images, manifest))
