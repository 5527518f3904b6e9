"""The checkpoint store: safetensors weights plus a JSON manifest, inside BentoML's model store.

The trainer writes checkpoints here and the service reads them; the manifest is the only thing the
two share. Nothing is ever unpickled: weights are safetensors and verified against the manifest's
sha256 before they are loaded.
"""
from . import fashion_mnist
from .checkpoint import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    Manifest,
    get_store,
    has_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
    verified_tag,
)
from .preprocess import InputNormalizer, resize_crop, to_model_input

__all__ = [
    "fashion_mnist", "MANIFEST_FILE", "WEIGHTS_FILE", "CheckpointError", "Manifest", "get_store", "has_checkpoint",
    "list_checkpoints", "load_checkpoint", "read_manifest", "save_checkpoint", "verified_tag", "to_model_input",
    "resize_crop", "InputNormalizer",
]
