"""The one definition of how an image becomes a model input, read from a checkpoint's manifest.

Training evaluation, the service and the load-test's offline check all call `to_model_input`, so an
image gives the same logits everywhere: resize the shorter side to `manifest.resize` (default: the
resolution), centre-crop `resolution`, convert to gray or RGB as the model was trained, scale to
0..1, then normalise with the manifest's mean and std.
"""
from __future__ import annotations

import torch
from torchvision.transforms.v2 import functional as F

from .checkpoint import Manifest

# ITU-R 601-2 luma, as PIL's convert("L").
_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)


def to_model_input(images: torch.Tensor, manifest: Manifest) -> torch.Tensor:
    """uint8 images (C,H,W) or (N,C,H,W) with C in {1,3} -> normalised float (N,in_chans,R,R)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    x = images if images.dim() == 4 else images.unsqueeze(0)
    if x.shape[1] not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels, got {x.shape[1]}")
    r = manifest.resolution
    x = F.resize(x, [manifest.resize or r], antialias=True)
    x = F.center_crop(x, [r, r])
    x = x.float().div_(255)
    if manifest.grayscale and x.shape[1] == 3:
        x = (x * _LUMA).sum(1, keepdim=True)
    if x.shape[1] != manifest.in_chans:
        x = x.expand(-1, manifest.in_chans, -1, -1) if x.shape[1] == 1 else (x * _LUMA).sum(1, keepdim=True)
    mean = torch.tensor(manifest.mean[: manifest.in_chans]).view(1, -1, 1, 1)
    std = torch.tensor(manifest.std[: manifest.in_chans]).view(1, -1, 1, 1)
    return (x - mean) / std
