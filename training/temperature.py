"""Score calibration by temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", 2017).

A network's softmax scores are usually over-confident. One scalar `T`, fitted on the validation split
by minimising the negative log-likelihood of softmax(logits / T), makes them calibrated probabilities
without changing any top-1 (T > 0 keeps the order of the logits). The trainer fits it for the chosen
weights and stores it in the manifest (`Manifest.temperature`); the worker divides the logits by it
before the softmax, so a served score of 0.9 is right about 90% of the time. The name is
"temperature", not "calibration", which in `engines/` names the int8 sample set.

The expected calibration error (ECE, 15 equal-width confidence bins) before and after is recorded on
the validation split (where T was fitted) and on the test split (which T never saw).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ECE_BINS = 15
# The search interval of 1/T: scores sharpened up to 20x or flattened down to 1/20.
INV_T_RANGE = (0.05, 20.0)


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    return float(F.cross_entropy(logits.double() / temperature, labels, reduction="mean"))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, tol: float = 1e-6) -> float:
    """The T that minimises the NLL of softmax(logits / T) on (logits, labels).

    The NLL is convex in 1/T (a log-sum-exp of linear functions minus a linear one), so a golden-section
    search on 1/T finds the one minimum deterministically, with no learning rate to tune."""
    if len(labels) == 0:
        raise ValueError("fitting a temperature needs labelled logits, got none")
    lo, hi = (math.log(x) for x in INV_T_RANGE)  # search log(1/T): the bracket spans three orders evenly
    g = (math.sqrt(5) - 1) / 2
    f = lambda u: nll(logits, labels, math.exp(-u))  # noqa: E731
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = f(a), f(b)
    while hi - lo > tol:
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = f(b)
    return math.exp(-(lo + hi) / 2)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Sum over equal-width confidence bins of |accuracy - mean confidence|, weighted by the bin's share."""
    conf, pred = probs.max(dim=1)
    right = (pred == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=conf.dtype)
    ece = 0.0
    for i in range(bins):
        inside = (conf > edges[i]) & (conf <= edges[i + 1]) if i else (conf >= 0) & (conf <= edges[1])
        if inside.any():
            ece += float(inside.double().mean()) * abs(float(right[inside].mean()) - float(conf[inside].double().mean()))
    return ece


@torch.no_grad()
def collect_logits(model, loader, normalize, device, channels_last: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of `model` on every batch of `loader`, as float32 on the CPU."""
    model.eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    outs, ys = [], []
    for images, labels in loader:
        outs.append(model(normalize(images.to(device)).contiguous(memory_format=fmt)).float().cpu())
        ys.append(labels)
    return torch.cat(outs), torch.cat(ys).long()


def score_calibration(val: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """Fit T on the validation (logits, labels); the ECE of both splits before and after, for the manifest."""
    t = fit_temperature(*val)

    def ece(split, temperature):
        return round(expected_calibration_error(torch.softmax(split[0].double() / temperature, 1), split[1]), 5)

    return {"temperature": round(t, 5), "ece_val_before": ece(val, 1.0), "ece_val_after": ece(val, t),
            "ece_test_before": ece(test, 1.0), "ece_test_after": ece(test, t), "bins": ECE_BINS}
