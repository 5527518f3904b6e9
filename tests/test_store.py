"""The checkpoint store: safetensors + manifest, verified by sha256."""
from pathlib import Path

import pytest
import torch

from models import create_model, model_config
from store import CheckpointError, Manifest, list_checkpoints, load_checkpoint, save_checkpoint


def _save(home, variant="compact"):
    model = create_model(variant, num_classes=4)
    man = Manifest(variant=variant, config=model_config(variant).to_dict(), num_classes=4,
                   classes=["a", "b", "c", "d"], dataset="fake", resolution=32, metrics={"top1": 0.25})
    return model, save_checkpoint(model, man, home=home)


def test_round_trip_gives_the_same_outputs(bentoml_home):
    model, tag = _save(bentoml_home)
    loaded, man = load_checkpoint(tag)  # BENTOML_HOME from the environment
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))
    assert man.classes == ["a", "b", "c", "d"] and len(man.sha256) == 64
    rows = list_checkpoints()
    assert rows[0]["tag"] == tag and rows[0]["variant"] == "compact" and rows[0]["top1"] == 0.25


def test_a_modified_weights_file_is_refused(bentoml_home):
    _, tag = _save(bentoml_home)
    weights = Path(list_checkpoints()[0]["path"]) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(tag)


def test_missing_checkpoint_names_the_tag(bentoml_home):
    with pytest.raises(CheckpointError, match="nope"):
        load_checkpoint("nope:123")
