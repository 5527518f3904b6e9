"""Start a run from a stored checkpoint's weights (`effnet train --init TAG`): transfer learning.

The usual way to a good classifier on one's own images without a GPU cluster is to fine-tune
weights trained on ImageNet: `effnet import-pretrained lite0` stores them, and

    effnet train --variant lite0 --data imagefolder:/data/flowers --init lite0-imagenet:latest

starts from them. The checkpoint is loaded like any other (sha256 verified, nothing unpickled) and
must be of the same variant (the same architecture). What does not carry over is rebuilt:
- the classifier (`classifier.*`) is initialised afresh when the classes differ, by name: the
  same ten classes in another order are other classes;
- a stem trained on RGB that now sees one channel (Fashion-MNIST) gets the sum of its weights over
  the three channels, which is what it computed when a gray image came as R = G = B; the other way
  round, each RGB channel gets a third of the gray weights;
- anything else whose shape differs is initialised afresh and listed.
Everything else, BatchNorm statistics included, starts as the checkpoint has it.
"""
from __future__ import annotations

from typing import Any

import torch

HEAD_PREFIX = "classifier."
STEM_CONV = "stem.conv.weight"


def init_from_checkpoint(model: torch.nn.Module, tag: str, variant: str, classes: list[str]) -> dict[str, Any]:
    """Copy the weights of checkpoint `tag` into `model` (a freshly created `variant` for `classes`).

    Returns what happened: {"from", "loaded", "adapted", "reset"} (tensor names for the last two).
    Raises ValueError for another variant, store.CheckpointError for a missing or corrupted checkpoint.
    """
    from store import load_checkpoint

    source, man = load_checkpoint(tag)
    if man.variant != variant:
        raise ValueError(f"--init {tag} holds a {man.variant!r} network, this run trains {variant!r}: the layers "
                         f"would not match (fine-tune a checkpoint of the same variant)")
    src = source.state_dict()
    dst = model.state_dict()
    same_classes = list(man.classes) == list(classes)
    out, adapted, reset = {}, [], []
    for name, target in dst.items():
        weights = src.get(name)
        if weights is None or (name.startswith(HEAD_PREFIX) and not same_classes):
            reset.append(name)
        elif weights.shape == target.shape:
            out[name] = weights
        elif name == STEM_CONV and weights.shape[0] == target.shape[0] and weights.shape[2:] == target.shape[2:]:
            if target.shape[1] == 1:  # RGB-trained stem, gray input: R = G = B, so the sum over channels
                out[name] = weights.sum(dim=1, keepdim=True)
            elif weights.shape[1] == 1:  # gray-trained stem, RGB input: a third of it per channel
                out[name] = weights.expand(-1, target.shape[1], -1, -1) / target.shape[1]
            else:
                reset.append(name)
                continue
            adapted.append(name)
        else:
            reset.append(name)
    model.load_state_dict(out, strict=False)
    return {"from": tag, "top1": man.metrics.get("top1"), "dataset": man.dataset, "loaded": len(out) - len(adapted),
            "adapted": adapted, "reset": reset}
