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


# resize_crop: the one preprocessing of the service, the trainer and the offline check ---------------

PHOTO = Manifest(variant="", config={}, num_classes=2, classes=["a", "b"], dataset="", resolution=224, resize=256)


def _stripes(h: int, w: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([128 + 100 * torch.sin(xx / 15.0) + 20 * torch.cos(yy / 3.0)] * 3).to(torch.uint8)


@pytest.mark.parametrize("h, w", [(1, 100_000), (100_000, 1), (3, 50_000), (40, 170)])
def test_extreme_aspect_ratios_are_cut_before_resizing(monkeypatch, h, w):
    # A 100000x1 PNG is a valid 100-byte file within any pixel limit; resized whole it would be
    # 256 x 25,600,000 (20 GB). The stand-in refuses such an input instead of allocating it.
    from torchvision.transforms.v2 import functional as F

    real, seen = F.resize, []

    def resize(x, *args, **kwargs):
        seen.append(tuple(x.shape[-2:]))
        assert max(seen[-1]) <= 4 * min(seen[-1]), f"resize was given {seen[-1]}"
        return real(x, *args, **kwargs)

    monkeypatch.setattr(F, "resize", resize)
    from store import resize_crop

    out = resize_crop(torch.full((3, h, w), 7, dtype=torch.uint8), PHOTO)
    assert out.shape == (1, 3, 224, 224) and seen and int(out.min()) == int(out.max()) == 7


@pytest.mark.parametrize("h, w, exact", [(60, 240, True), (240, 60, True), (7, 1000, False), (30, 200, False)])
def test_the_cut_leaves_what_the_centre_crop_sees(h, w, exact):
    from torchvision.transforms.v2 import functional as F

    from store import resize_crop

    x = _stripes(h, w)
    ref = F.center_crop(F.resize(x, [256], antialias=True), [224, 224]).unsqueeze(0)
    got = resize_crop(x, PHOTO)
    if exact:  # up to 4:1 nothing is cut
        assert torch.equal(got, ref)
    else:  # the resampling grid may shift by a fraction of a pixel
        assert (got.int() - ref.int()).abs().max() <= 2


def test_the_listing_shows_every_entry_and_marks_the_broken_ones(bentoml_home, capsys):
    # One bad folder (no model.yaml, an upper-case name) made BentoML's listing, so `effnet store`,
    # fail with a traceback; a missing or invalid manifest was left out without a word.
    import json
    import shutil

    from cli.main import main as effnet

    _, tag = _save(bentoml_home)
    good = Path(list_checkpoints()[0]["path"])
    models = bentoml_home / "models"
    for name, damage in (("noyaml", "model.yaml"), ("nomanifest", "manifest.json"), ("Upper", None),
                         ("lots", "params"), ("flip", "weights")):
        copy = models / name / "v1"
        shutil.copytree(good, copy)
        if damage == "params":
            man = json.loads((copy / "manifest.json").read_text())
            (copy / "manifest.json").write_text(json.dumps({**man, "params": "lots"}))
        elif damage == "weights":
            data = bytearray((copy / "model.safetensors").read_bytes())
            data[-5] ^= 0xFF
            (copy / "model.safetensors").write_bytes(bytes(data))
        elif damage:
            (copy / damage).unlink()
    (models / "empty" / "v1").mkdir(parents=True)
    assert effnet(["store", "--json"]) == 0
    rows = {r["tag"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {tag, "noyaml:v1", "nomanifest:v1", "Upper:v1", "lots:v1", "flip:v1", "empty:v1"}
    assert rows[tag]["problem"] is None and rows[tag]["verified"] is None
    assert "model.yaml" in rows["noyaml:v1"]["problem"] and "manifest.json" in rows["nomanifest:v1"]["problem"]
    assert "lower-case" in rows["Upper:v1"]["problem"] and "params" in rows["lots:v1"]["problem"]
    assert rows["flip:v1"]["problem"] is None  # the sha256 is checked only when asked
    assert effnet(["store"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n! ") == 5 and "not verified" in out
    assert effnet(["store", "--verify"]) == 0
    assert "sha256" in capsys.readouterr().out
    # callers that pick one to use get the usable ones (the sha256 is checked when one is loaded)
    assert {r["tag"] for r in list_checkpoints()} == {tag, "flip:v1"}


def test_the_weights_are_as_readable_as_the_manifest(bentoml_home):
    # safetensors wrote them 0600: a service running as another user could not read them
    _save(bentoml_home)
    folder = Path(list_checkpoints()[0]["path"])
    assert (folder / "model.safetensors").stat().st_mode & 0o777 == (folder / "manifest.json").stat().st_mode & 0o777
