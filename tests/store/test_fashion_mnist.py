"""store.fashion_mnist: the one reader of the Fashion-MNIST IDX files, plain or gzipped, wherever
$FASHION_MNIST_DIR points, with an error that says how to get them."""
import gzip
import struct

import pytest
import torch

from store import fashion_mnist


def _idx(array: torch.Tensor) -> bytes:
    """`array` (uint8) as an IDX file: two zero bytes, type 0x08, the number of dimensions, sizes, data."""
    return struct.pack(f">HBB{array.dim()}I", 0, 0x08, array.dim(), *array.shape) + array.numpy().tobytes()


def _write_split(folder, prefix: str, n: int, gz: bool) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    labels = torch.arange(n, dtype=torch.uint8) % 10
    for kind, data in (("images-idx3", images), ("labels-idx1", labels)):
        raw = _idx(data)
        name = f"{prefix}-{kind}-ubyte"
        (folder / (name + ".gz" if gz else name)).write_bytes(gzip.compress(raw) if gz else raw)
    return images, labels


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "plain"])
def test_read_idx_reads_plain_and_gzipped_files_alike(tmp_path, gz):
    array = torch.arange(24, dtype=torch.uint8).reshape(2, 3, 4)
    path = tmp_path / ("a.gz" if gz else "a")
    path.write_bytes(gzip.compress(_idx(array)) if gz else _idx(array))
    out = fashion_mnist.read_idx(path)
    assert out.dtype == torch.uint8 and torch.equal(out, array)


def test_read_idx_refuses_what_is_not_an_idx_file_of_bytes(tmp_path):
    (tmp_path / "floats").write_bytes(struct.pack(">HBBI", 0, 0x0D, 1, 1) + b"\0\0\0\0")
    with pytest.raises(ValueError, match="not an IDX file of unsigned bytes"):
        fashion_mnist.read_idx(tmp_path / "floats")
    (tmp_path / "short").write_bytes(_idx(torch.zeros(4, dtype=torch.uint8))[:-1])
    with pytest.raises(ValueError, match="promises 4 bytes"):
        fashion_mnist.read_idx(tmp_path / "short")


def test_load_reads_both_splits_from_the_folder_fashion_mnist_dir_names(tmp_path, monkeypatch):
    train = _write_split(tmp_path, "train", 5, gz=True)
    test = _write_split(tmp_path, "t10k", 3, gz=False)
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    assert fashion_mnist.data_dir() == tmp_path and fashion_mnist.available()
    for split, (images, labels) in (("train", train), ("test", test)):
        x, y = fashion_mnist.load(split)
        assert x.dtype == torch.uint8 and x.shape == (len(labels), 28, 28) and torch.equal(x, images)
        assert y.dtype == torch.int64 and y.tolist() == labels.tolist()
    with pytest.raises(ValueError, match="splits train, test"):
        fashion_mnist.load("val")


def test_without_the_variable_the_folder_is_the_debian_packages(monkeypatch):
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    assert str(fashion_mnist.data_dir()) == "/usr/share/datasets/fashion-mnist"
    monkeypatch.setenv("FASHION_MNIST_DIR", "")  # empty: unset, not the current folder
    assert str(fashion_mnist.data_dir()) == "/usr/share/datasets/fashion-mnist"


def test_missing_files_are_an_error_naming_the_folder_the_variable_and_the_package(tmp_path, monkeypatch):
    _write_split(tmp_path, "train", 2, gz=True)  # the test split is missing
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    assert not fashion_mnist.available()
    with pytest.raises(FileNotFoundError) as e:
        fashion_mnist.load("test")
    message = str(e.value)
    assert str(tmp_path) in message and "$FASHION_MNIST_DIR" in message and "dataset-fashion-mnist" in message
    assert "t10k-images-idx3-ubyte.gz" in message


@pytest.mark.skipif(not fashion_mnist.available(fashion_mnist.DEFAULT_DIR),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_the_debian_package_holds_60000_training_and_10000_test_images(monkeypatch):
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    x, y = fashion_mnist.load("test")
    assert x.shape == (10_000, 28, 28) and y.shape == (10_000,) and y[:5].tolist() == [9, 2, 1, 1, 6]
    assert sorted(torch.bincount(y).tolist()) == [1000] * 10
    x, y = fashion_mnist.load("train")
    assert x.shape == (60_000, 28, 28) and torch.bincount(y).tolist() == [6000] * 10
    # MEAN and STD are the training split's statistics on 0..1 pixels
    pixels = x.float() / 255
    assert pixels.mean().item() == pytest.approx(fashion_mnist.MEAN[0], abs=5e-4)
    assert pixels.std().item() == pytest.approx(fashion_mnist.STD[0], abs=5e-4)
    assert len(fashion_mnist.CLASSES) == 10 and fashion_mnist.CLASSES[9] == "Ankle boot"
