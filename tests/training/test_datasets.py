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
    assert len(spec.train) == 6 + 6 + 3 + 2  # the symlinked sub-folder followed once, the loop not again
    warned = " ".join(r.message for r in caplog.records)
    assert "['onlyval']" in warned and "['empty']" in warned and "['empty', 'onlytrain']" in warned
    # --limit-train takes from every class (the first N files in class order were all cats), seeded
    cfg = resolve_config({"data": f"imagefolder:{root}", "resolution": 32, "limit_train": 6, "limit_test": 2})
    picked = load_data(cfg).train.samples
    assert sorted({label for _, label in picked}) == [0, 1, 3] and len(picked) == 6
    assert picked == load_data(cfg).train.samples
    assert picked != load_data(resolve_config({**cfg.to_dict(), "seed": 1})).train.samples
    assert {label for _, label in load_data(cfg).test.samples} == {0, 1}
    # one class is refused
    _folder_of_images(tmp_path / "one", {"train/only": 3, "val/only": 2})
    with pytest.raises(ValueError, match="at least 2 class"):
        load_data(resolve_config({"data": f"imagefolder:{tmp_path / 'one'}", "resolution": 32}))
