"""Training data: Fashion-MNIST as the service resizes it, and ImageFolder trees decoded as the service
decodes requests, with their quirks ignored, warned about or refused."""
from pathlib import Path

import pytest
import torch

from cli.main import main as effnet
from store import fashion_mnist, read_manifest
from training import resolve_config
from training.train import main as train_main


@pytest.mark.skipif(not fashion_mnist.available(), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_is_one_channel_resized_as_the_service_resizes():
    from store import Manifest, resize_crop
    from training.data import load_data

    spec = load_data(resolve_config({"data": "fashion-mnist", "resolution": 40, "limit_train": 8, "limit_test": 8}))
    assert spec.classes == fashion_mnist.CLASSES and spec.in_chans == 1 and spec.grayscale and spec.resize == 40
    assert spec.mean == fashion_mnist.MEAN and spec.std == fashion_mnist.STD
    raw = fashion_mnist.load("test")[0][:8].unsqueeze(1)
    man = Manifest(variant="", config={}, num_classes=10, classes=[], dataset="", resolution=40, in_chans=1, resize=40)
    assert torch.equal(torch.stack([spec.test[i][0] for i in range(8)]), resize_crop(raw, man))
    assert len(spec.train) == 8 and len(spec.test) == 8 and spec.test[0][0].dtype == torch.uint8


def test_fashion_mnist_is_read_from_the_folder_fashion_mnist_dir_names(tmp_path, monkeypatch):
    import gzip

    from training.data import fashion_mnist_folder, load_data

    # 4 training and 2 test images of 28x28, each filled with its index; the test split unpacked
    for prefix, n, pack in (("train", 4, gzip.compress), ("t10k", 2, lambda b: b)):
        images = bytes([0, 0, 8, 3, 0, 0, 0, n, 0, 0, 0, 28, 0, 0, 0, 28]) + b"".join(bytes([i]) * 784 for i in range(n))
        labels = bytes([0, 0, 8, 1, 0, 0, 0, n]) + bytes(range(n))
        suffix = ".gz" if prefix == "train" else ""
        (tmp_path / f"{prefix}-images-idx3-ubyte{suffix}").write_bytes(pack(images))
        (tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}").write_bytes(pack(labels))
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    assert fashion_mnist_folder() == tmp_path
    spec = load_data(resolve_config({"data": "fashion-mnist", "resolution": 32}))
    assert len(spec.train) == 4 and len(spec.test) == 2
    assert [int(spec.test[i][0].float().mean()) for i in range(2)] == [0, 1] and spec.test[1][1] == 1


def test_imagefolder_layout_trains_with_the_folder_name_as_dataset(tmp_path, bentoml_home):
    from PIL import Image

    root = tmp_path / "tinynet"
    for split in ("train", "val"):
        for k, cls in enumerate(("cat", "dog")):
            (root / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (40 + i, 36), (80 * k + 40, 90, 30 * i)).save(root / split / cls / f"{i}.png")
    out = train_main(resolve_config({"variant": "compact", "data": f"imagefolder:{root}", "resolution": 32,
                                     "batch_size": 4, "epochs": 1, "eval_every": 0, "run_dir": str(tmp_path / "run")}),
                     progress=False)
    man, _ = read_manifest(out["tag"])
    assert out["tag"].startswith("compact-tinynet:") and man.classes == ["cat", "dog"]
    assert man.in_chans == 3 and not man.grayscale and man.resize == 37 and man.metrics["test_images"] == 8


def _folder_of_images(root: Path, layout: dict[str, int], size=(20, 16)) -> None:
    """`layout`: {"train/cat": 3, ...} -> that many small distinct PNGs in each folder."""
    from PIL import Image

    for folder, n in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", size, (40 * i % 256, 90, 30)).save(root / folder / f"{i}.png")


def test_an_undecodable_file_in_an_imagefolder_is_logged_and_replaced_by_the_next(tmp_path, caplog):
    from PIL import Image

    from training.data import ImageFiles

    for i in range(3):
        Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "1.png").write_bytes((tmp_path / "1.png").read_bytes()[:30])  # truncated
    ds = ImageFiles(tmp_path.parent, [tmp_path.name], transform=lambda x: x)
    with caplog.at_level("WARNING", logger="effnet.data"):
        got = [ds[i][0][0, 0, 0].item() for i in range(3)] + [ds[1][0][0, 0, 0].item()]
    assert got == [0, 120, 120, 120]  # 1.png -> the next, 2.png, every time
    assert sum("1.png: it cannot be decoded" in r.message for r in caplog.records) == 1


def test_an_imagefolder_is_decoded_as_the_service_decodes_every_allowed_format(tmp_path):
    # torchvision.io alone gave an animated GIF as 2 frames (torch.stack failed), a 16-bit PNG as
    # uint16 (promotion error) and refused every valid BMP.
    import numpy as np
    from PIL import Image

    from store.images import decode_image
    from training.data import ImageFiles

    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    frames = [Image.new("RGB", (12, 10), c) for c in ((200, 0, 0), (0, 200, 0))]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    Image.fromarray(np.full((10, 12), 40000, dtype=np.uint16)).save(folder / "deep.png")
    Image.new("RGB", (12, 10), (10, 20, 30)).save(folder / "plain.bmp")
    Image.new("CMYK", (12, 10), (0, 255, 0, 0)).save(folder / "print.jpg")
    Image.new("RGBA", (12, 10), (0, 0, 0, 0)).save(folder / "clear.webp")
    ds = ImageFiles(tmp_path / "train", ["a"], transform=lambda x: x)
    assert len(ds) == 5
    for i, (path, _) in enumerate(ds.samples):
        x = ds[i][0]
        assert x.dtype == torch.uint8 and tuple(x.shape) == (3, 10, 12), path
        assert np.array_equal(x.numpy(), decode_image(path.read_bytes(), max_pixels=10**6)), path
    assert not ds.bad
    # the service's own module still has every name, from the one decoder
    import service.images

    assert service.images.decode_image is decode_image


def test_an_imagefolder_of_undecodable_files_is_a_clean_error(tmp_path, bentoml_home, capsys):
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / "d" / split / cls).mkdir(parents=True)
            for i in range(9):
                (tmp_path / "d" / split / cls / f"{i}.jpg").write_bytes(b"not a jpeg")
    assert effnet(["train", "--variant", "compact", "--data", f"imagefolder:{tmp_path / 'd'}", "--resolution", "32",
                   "--batch-size", "4", "--epochs", "1", "--no-progress", "--run-dir", str(tmp_path / "run")]) == 2
    assert "cannot be decoded" in capsys.readouterr().err


def test_imagefolder_layout_quirks_are_ignored_warned_or_refused(tmp_path, caplog):
    from training.data import load_data

    root = tmp_path / "set"
    _folder_of_images(root, {
        "train/cat": 6, "train/dog": 6, "train/onlytrain": 2, "train/empty": 0,
        "train/.ipynb_checkpoints": 2, "train/@eaDir": 2, "train/__MACOSX": 2, "train/cat/.hidden": 2,
        "val/cat": 2, "val/dog": 2, "val/onlyval": 2, "outside/more": 3,
    })
    (root / "train" / "dog" / "linked").symlink_to(root / "outside" / "more", target_is_directory=True)
    (root / "outside" / "more" / "loop").symlink_to(root / "train" / "dog", target_is_directory=True)
    with caplog.at_level("WARNING", logger="effnet.data"):
        spec = load_data(resolve_config({"data": f"imagefolder:{root}", "resolution": 32}))
    assert spec.classes == ["cat", "dog", "empty", "onlytrain"]  # no hidden or system folders
    # the symlinked sub-folder followed once, the loop not again; a tenth held out of train/ for validation
    assert len(spec.train) + len(spec.val) == 6 + 6 + 3 + 2 and len(spec.val) == 2
    assert not {p for p, _ in spec.train.samples} & {p for p, _ in spec.val.samples}
    assert spec.split == {"val_images": 2, "val_seed": 0, "val_from": "train"}
    warned = " ".join(r.message for r in caplog.records)
    assert "['onlyval']" in warned and "['empty']" in warned and "['empty', 'onlytrain']" in warned
    # --limit-train takes from every class (the first N files in class order were all cats), seeded
    cfg = resolve_config({"data": f"imagefolder:{root}", "resolution": 32, "limit_train": 6, "limit_test": 2})
    picked = load_data(cfg).train.samples
    assert sorted({label for _, label in picked}) == [0, 1, 3] and len(picked) == 6
    assert picked == load_data(cfg).train.samples
    assert picked != load_data(resolve_config({**cfg.to_dict(), "seed": 1})).train.samples
    assert {label for _, label in load_data(cfg).test.samples} == {0, 1}
    # with a test/ folder, the folders are the splits: val/ validates, test/ tests, train/ is kept whole
    _folder_of_images(tmp_path / "three", {"train/a": 4, "train/b": 4, "val/a": 2, "val/b": 2, "test/a": 3, "test/b": 3})
    three = load_data(resolve_config({"data": f"imagefolder:{tmp_path / 'three'}", "resolution": 32}))
    assert (len(three.train), len(three.val), len(three.test)) == (8, 4, 6) and three.split["val_from"] == "val/"
    assert all(p.parent.parent.name == "test" for p, _ in three.test.samples)
    # one class is refused
    _folder_of_images(tmp_path / "one", {"train/only": 3, "val/only": 2})
    with pytest.raises(ValueError, match="at least 2 class"):
        load_data(resolve_config({"data": f"imagefolder:{tmp_path / 'one'}", "resolution": 32}))


def test_the_validation_split_is_stratified_disjoint_and_reproducible_from_its_seed():
    from training.data import stratified_split, val_count

    labels = [i % 10 for i in range(60_000)]
    train, val = stratified_split(labels, val_count(-1, len(labels), "fashion-mnist"), seed=0)
    assert len(val) == 5000 and len(train) == 55_000 and not set(train) & set(val)
    assert sorted(train + val) == list(range(60_000))
    assert [sum(labels[i] == c for i in val) for c in range(10)] == [500] * 10  # each class in proportion
    assert stratified_split(labels, 5000, seed=0) == (train, val)  # the seed decides, nothing else
    assert stratified_split(labels, 5000, seed=1)[1] != val
    # unequal classes: quotas in proportion, largest remainders first, summing to the count asked for
    skewed = [0] * 70 + [1] * 20 + [2] * 10
    _, v = stratified_split(skewed, 11, seed=3)
    assert len(v) == 11 and [sum(skewed[i] == c for i in v) for c in range(3)] == [8, 2, 1]
    assert val_count(0.1, 1000, "imagefolder") == 100 and val_count(0, 1000, "fake") == 0
    assert val_count(-1, 4, "fashion-mnist") == 0  # auto on a tiny set holds nothing out
    with pytest.raises(ValueError, match="leaves too few to train on"):
        val_count(999, 1000, "fashion-mnist")


@pytest.mark.skipif(not fashion_mnist.available(), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_holds_out_5000_training_images_for_validation_and_keeps_the_test_split_whole():
    from training.data import load_data

    spec = load_data(resolve_config({"data": "fashion-mnist", "resolution": 28}))
    assert (len(spec.train), len(spec.val), len(spec.test)) == (55_000, 5_000, 10_000)
    assert spec.split == {"val_images": 5000, "val_seed": 0, "val_from": "train"}
    assert torch.bincount(spec.val.labels).tolist() == [500] * 10
    # disjoint from the training images: no validation image is also a training image, pixel for pixel
    train = {bytes(x.numpy()) for x in spec.train.images}
    assert not any(bytes(x.numpy()) in train for x in spec.val.images[:500])
    none = load_data(resolve_config({"data": "fashion-mnist", "resolution": 28, "val_size": 0}))
    assert none.val is None and len(none.train) == 60_000
