"""Resumable training state as `state.safetensors` + `state.json`: nothing is pickled.

Tensors (model, EMA, optimizer moments, torch/CUDA RNG states, numpy's RNG key) go into the
safetensors file under flat keys; everything else (epoch, step, config, optimizer hyperparameters,
scaler, python's RNG state) into the JSON. The two files are written to temporary names and renamed,
so an interrupted save leaves the previous state intact; the JSON records the sha256 of the tensors.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from store.checkpoint import CheckpointError, sha256_file

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"


def _flatten_optimizer(sd: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Optimizer state tensors -> `optim.{param}.{name}` keys; the rest stays as JSON."""
    meta: dict[str, dict[str, Any]] = {}
    for pid, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                meta.setdefault(str(pid), {})[key] = value
    return {"param_groups": sd["param_groups"], "non_tensor_state": meta, "ids": [str(k) for k in sd["state"]]}


def _unflatten_optimizer(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(pid): dict(meta["non_tensor_state"].get(pid, {})) for pid in meta["ids"]}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state[int(pid)][name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, pstate, gauss = random.getstate()
    return {"numpy": [name, int(pos), int(has_gauss), float(cached)], "python": [version, list(pstate), gauss]}


def _set_rng_state(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, pstate, gauss = meta["python"]
    random.setstate((version, tuple(pstate), gauss))


def save_state(run_dir: str | Path, *, model, ema, optimizer, scaler, epoch: int, step: int, config: dict,
               extra: dict | None = None) -> Path:
    """Write everything `load_state` needs to continue after `epoch` (0-based, completed)."""
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in (("model.", model), ("ema.", ema.module)):
        for k, v in module.state_dict().items():
            tensors[prefix + k] = v.detach().cpu().contiguous().clone()
    optim_meta = _flatten_optimizer(optimizer.state_dict(), tensors)
    rng_meta = _rng_state(tensors)
    tmp = run_dir / (STATE_TENSORS + ".tmp")
    save_file(tensors, str(tmp))
    meta = {
        "epoch": epoch, "step": step, "ema_updates": ema.updates, "config": config,
        "optimizer": optim_meta, "scaler": scaler.state_dict(), "rng": rng_meta,
        "tensors_sha256": sha256_file(tmp), **(extra or {}),
    }
    tmp_json = run_dir / (STATE_JSON + ".tmp")
    tmp_json.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, run_dir / STATE_TENSORS)
    os.replace(tmp_json, run_dir / STATE_JSON)
    return run_dir


# What load_state and a resume read from the JSON; a state without one of them cannot continue.
STATE_KEYS = ("epoch", "step", "ema_updates", "config", "optimizer", "scaler", "rng", "tensors_sha256")


def read_state_meta(run_dir: str | Path) -> dict[str, Any]:
    """The JSON part of a state; CheckpointError (a clean CLI error) naming what is wrong with it."""
    path = Path(run_dir) / STATE_JSON
    if not path.is_file():
        raise FileNotFoundError(f"no training state in {run_dir} (expected {STATE_JSON} and {STATE_TENSORS})")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): the state is damaged; start the run again") from None
    missing = [k for k in STATE_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing or not isinstance(meta["config"], dict):
        raise CheckpointError(f"{path} lacks {', '.join(missing) or 'a config mapping'}: the state is damaged or "
                              "not from `effnet train`; start the run again")
    return meta


def mark_exported(run_dir: str | Path, tag: str) -> None:
    """Record in the state which checkpoint the finished run stored, so a resume does not store it again."""
    path = Path(run_dir) / STATE_JSON
    meta = json.loads(path.read_text())
    meta["exported"] = tag
    tmp = path.with_name(STATE_JSON + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, path)


def _match_param_layout(optimizer) -> None:
    """Give each moment tensor its parameter's memory layout again (channels_last for conv weights).

    safetensors stores them contiguous. The fused AdamW kernels pair parameter, gradient and moments
    element by element in memory, so moments in another layout than their channels_last parameter
    update the wrong elements: a resumed run diverges at its first step (fused AdamW on a CPU:
    weights 0.12 apart after 2 steps). foreach kernels fall back to a slow path for mixed layouts.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            for k, v in st.items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    st[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def load_state(run_dir: str | Path, *, model, ema, optimizer, scaler) -> dict[str, Any]:
    """Restore model, EMA, optimizer, scaler and RNG states; returns the JSON part (epoch, step, ...)."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    meta = read_state_meta(run_dir)
    tensors_path = run_dir / STATE_TENSORS
    if not tensors_path.is_file():
        raise CheckpointError(f"{tensors_path} is missing: the state is incomplete; start the run again")
    # CheckpointError, a RuntimeError the CLI words without a traceback: a damaged state is the user's
    # to replace, not a bug.
    if sha256_file(tensors_path) != meta["tensors_sha256"]:
        raise CheckpointError(f"{tensors_path}: sha256 does not match {STATE_JSON}; the state is corrupted "
                              "(truncated or modified): start the run again")
    try:
        tensors = load_file(str(tensors_path), device="cpu")
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        ema.module.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        ema.updates = meta["ema_updates"]
        # CPU tensors: load_state_dict moves the moments to each parameter's device and keeps `step` where
        # the optimizer wants it.
        optimizer.load_state_dict(_unflatten_optimizer(meta["optimizer"], tensors))
        _match_param_layout(optimizer)
        scaler.load_state_dict(meta["scaler"])
        _set_rng_state(meta["rng"], tensors)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"the state in {run_dir} does not fit this run's model and optimizer "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None
    return meta
