"""Save, list, verify and load checkpoints in a BentoML model store.

A checkpoint is a BentoML model (`name:version` tag, labels `variant` and `dataset`, metrics in its
metadata) whose folder holds:
- `model.safetensors`: the state_dict, tensors only;
- `manifest.json`: everything needed to rebuild, verify and use the model (see `Manifest`);
- optionally, informational files such as the trainer's `train_log.jsonl` and `confusion.png`.

The store lives under `$BENTOML_HOME/models` (BentoML's default `~/bentoml`), read at call time so
every command and test honours `BENTOML_HOME`; a `home=` argument overrides it. A served bento that
carries its checkpoints reads them from its own store (`store.paths.models_dir`).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .paths import bentoml_home, models_dir

WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted or does not match its manifest."""


@dataclass
class Manifest:
    variant: str  # registry name (models.list_models())
    config: dict[str, Any]  # models.NetConfig.to_dict(): rebuilds the exact architecture
    num_classes: int
    classes: list[str]
    dataset: str
    resolution: int  # square input side the model was trained/evaluated at
    in_chans: int = 3
    # Preprocessing: resize the shorter side to `resize`, centre-crop `resolution`, scale to 0..1,
    # then (x - mean) / std per channel. Grayscale data is replicated to 3 channels when in_chans=3.
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    resize: int | None = None
    grayscale: bool = False  # trained on grayscale images (replicated to in_chans channels)
    # Scores are softmax(logits / temperature): fitted on the validation split by the trainer so that they are
    # calibrated probabilities (training/temperature.py); 1.0 for checkpoints made without one.
    temperature: float = 1.0
    metrics: dict[str, Any] = field(default_factory=dict)  # on the test split: top1/top5 as fractions, per_class, ...
    training: dict[str, Any] = field(default_factory=dict)  # the resolved training configuration
    params: int = 0
    macs: int = 0  # at `resolution`
    sha256: str = ""  # of WEIGHTS_FILE
    weights_file: str = WEIGHTS_FILE
    created: str = ""
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def _home(home: str | os.PathLike | None) -> Path:
    return bentoml_home(home)


def get_store(home: str | os.PathLike | None = None):
    """BentoML's ModelStore under `home` (default: $BENTOML_HOME, else ~/bentoml)."""
    from bentoml._internal.models.model import ModelStore

    path = models_dir(home)
    path.mkdir(parents=True, exist_ok=True)
    return ModelStore(str(path))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(
    model: nn.Module, manifest: Manifest, *, name: str | None = None, home: str | os.PathLike | None = None,
    extra_files: dict[str, str | os.PathLike] | None = None,
) -> str:
    """Write `model`'s weights and `manifest` as a new model in the store; returns its tag.

    `extra_files` ({name in the folder: source path}) are copied in beside them (the trainer's epoch
    log and confusion matrix); they are informational and not covered by the sha256.
    """
    import shutil

    import bentoml
    from safetensors.torch import save

    name = name or manifest.variant.replace(".", "_")
    # safetensors refuses shared storage and non-contiguous tensors; BN counters are harmless to copy.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    labels = {"variant": manifest.variant, "dataset": manifest.dataset, "project": "effnet"}
    meta = {k: manifest.metrics.get(k) for k in ("top1", "top5") if k in manifest.metrics}
    meta.update(resolution=manifest.resolution, num_classes=manifest.num_classes, params=manifest.params)
    with bentoml.models.create(name, labels=labels, metadata=meta, _model_store=get_store(home)) as bento_model:
        weights = Path(bento_model.path_of(WEIGHTS_FILE))
        # Written by Python, not safetensors' save_file: that creates the file 0600 whatever the umask,
        # unlike every other file here (0644), so a service running as another user than the trainer
        # could read the manifest but not the weights.
        weights.write_bytes(save(state, metadata={"variant": manifest.variant}))
        manifest.sha256 = sha256_file(weights)
        manifest.weights_file = WEIGHTS_FILE
        manifest.created = manifest.created or time.strftime("%Y-%m-%dT%H:%M:%S%z")
        Path(bento_model.path_of(MANIFEST_FILE)).write_text(json.dumps(asdict(manifest), indent=2))
        for fname, src in (extra_files or {}).items():
            if fname in (WEIGHTS_FILE, MANIFEST_FILE) or Path(fname).name != fname:
                raise ValueError(f"extra file name {fname!r} must be a plain name other than the weights/manifest")
            shutil.copyfile(src, bento_model.path_of(fname))
        tag = str(bento_model.tag)
    return tag


def _resolve(tag: str, home: str | os.PathLike | None) -> Path:
    """The folder of a stored checkpoint; `tag` may be `name`, `name:latest` or `name:version`."""
    try:
        return Path(get_store(home).get(tag).path)
    except Exception as e:  # bentoml raises NotFound / BentoMLException
        raise CheckpointError(f"checkpoint {tag!r} not found in store {_home(home)}: {e}") from None


def read_manifest(tag_or_path: str | os.PathLike, home: str | os.PathLike | None = None) -> tuple[Manifest, Path]:
    """The manifest and folder of a checkpoint, given a store tag or a checkpoint folder path."""
    folder = Path(tag_or_path)
    if not (folder / MANIFEST_FILE).is_file():
        folder = _resolve(str(tag_or_path), home)
    mpath = folder / MANIFEST_FILE
    try:
        manifest = Manifest.from_dict(json.loads(mpath.read_text()))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {folder} has no {MANIFEST_FILE}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, AttributeError) as e:  # AttributeError: not a mapping
        raise CheckpointError(f"checkpoint {folder}: unreadable {MANIFEST_FILE}: {e}") from None
    return manifest, folder


def has_checkpoint(tag_or_path: str | os.PathLike, home: str | os.PathLike | None = None) -> bool:
    """Whether the store holds a readable checkpoint under this tag (e.g. `name:latest`)."""
    try:
        read_manifest(tag_or_path, home)
        return True
    except CheckpointError:
        return False


def _verified_weights(folder: Path, manifest: Manifest) -> Path:
    """The weights file, once its sha256 matches the manifest's; raises `CheckpointError`."""
    weights = folder / manifest.weights_file
    if not weights.is_file():
        raise CheckpointError(f"checkpoint {folder}: weights file {manifest.weights_file} is missing")
    digest = sha256_file(weights)
    if digest != manifest.sha256:
        raise CheckpointError(
            f"checkpoint {folder}: sha256 of {manifest.weights_file} is {digest[:12]}..., manifest says "
            f"{manifest.sha256[:12]}...; the weights were modified or corrupted. Re-create the checkpoint."
        )
    return weights


def verified_tag(tag_or_path: str | os.PathLike, home: str | os.PathLike | None = None) -> str:
    """The `name:version` of a stored checkpoint (`name` and `name:latest` resolved), once the sha256 of its
    weights matches its manifest: what a bento that packs it declares. Raises `CheckpointError`."""
    manifest, folder = read_manifest(tag_or_path, home)
    _verified_weights(folder, manifest)
    return f"{folder.parent.name}:{folder.name}"


def load_checkpoint(
    tag_or_path: str | os.PathLike, home: str | os.PathLike | None = None, device: str = "cpu"
) -> tuple[nn.Module, Manifest]:
    """Verify and load a checkpoint: sha256 of the weights must match the manifest.

    Returns the model in eval mode and its manifest. Raises `CheckpointError` with the checkpoint and
    the problem named; never unpickles anything.
    """
    from safetensors.torch import load_file

    from models import build_from_config

    manifest, folder = read_manifest(tag_or_path, home)
    weights = _verified_weights(folder, manifest)
    try:
        model = build_from_config(manifest.config, num_classes=manifest.num_classes, in_chans=manifest.in_chans)
        model.load_state_dict(load_file(str(weights), device=device))
    except Exception as e:
        raise CheckpointError(f"checkpoint {folder}: weights do not fit variant {manifest.variant!r}: {e}") from None
    return model.to(device).eval(), manifest


def _problem(folder: Path, man: Manifest | None, verify: bool) -> str | None:
    """Why a checkpoint folder cannot be served, or None; the sha256 only with `verify`."""
    if folder.parent.name != folder.parent.name.lower():
        return "the name folder is not lower-case: BentoML cannot load it (rename the folder)"
    if not (folder / "model.yaml").is_file():
        return "no model.yaml: BentoML cannot load it"
    if man is None:
        return None
    for key in ("num_classes", "resolution", "params"):
        value = getattr(man, key)
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{MANIFEST_FILE}: {key} is {value!r}, not a whole number"
    top1 = man.metrics.get("top1") if isinstance(man.metrics, dict) else "?"
    if top1 is not None and not (isinstance(top1, (int, float)) and 0 <= top1 <= 1):
        return f"{MANIFEST_FILE}: top1 is {top1!r}, not a fraction in [0, 1]"
    try:
        from models import get_variant

        get_variant(man.variant)
    except Exception:
        return f"{MANIFEST_FILE}: unknown variant {man.variant!r}"
    weights = folder / str(man.weights_file)
    if not weights.is_file():
        return f"weights file {man.weights_file} is missing"
    if verify and sha256_file(weights) != man.sha256:
        return f"sha256 of {man.weights_file} does not match the manifest: modified or corrupted"
    return None


def list_checkpoints(home: str | os.PathLike | None = None, *, include_broken: bool = False,
                     verify: bool = False) -> list[dict[str, Any]]:
    """One row per stored checkpoint of this project, newest first.

    The folders are walked here rather than listed by BentoML's ModelStore.list(), which raises on
    the first bad entry (a version folder without model.yaml, an upper-case name folder) and so hides
    every good one. `include_broken`: checkpoints that cannot be served are listed too, each with a
    `problem` (else left out, for the callers that pick one to use). `verify`: check the
    sha256 of every weights file, which reads all of them (minutes on a large store), so it is asked
    for; `verified` says whether it was done. Another project's BentoML models are left out.
    """
    root = models_dir(home)
    rows = []
    for folder in sorted(root.glob("*/*")) if root.is_dir() else []:
        if not folder.is_dir():
            continue
        man, problem = None, None
        if not (folder / MANIFEST_FILE).is_file():
            yaml_file = folder / "model.yaml"
            if yaml_file.is_file() and not (folder / WEIGHTS_FILE).is_file() and (
                    "project: effnet" not in yaml_file.read_text(errors="replace")):
                continue  # some other project's BentoML model
            problem = f"no {MANIFEST_FILE}"
        else:
            try:
                man, _ = read_manifest(folder)
            except CheckpointError as e:
                problem = str(e).replace(f"checkpoint {folder}: ", "")
        problem = _problem(folder, man, verify) or problem
        if problem and not include_broken:
            continue
        top1 = man.metrics.get("top1") if man and isinstance(man.metrics, dict) else None
        rows.append(
            {
                "tag": f"{folder.parent.name}:{folder.name}", "variant": man and man.variant,
                "dataset": man and man.dataset, "classes": man and man.num_classes,
                "resolution": man and man.resolution, "top1": top1, "params": man and man.params,
                "created": str(man.created) if man else "", "path": str(folder), "problem": problem,
                "verified": (problem is None) if verify else None,
            }
        )
    rows.sort(key=lambda r: r["created"], reverse=True)
    return rows
