"""Durable writes (store/durable.py) and the state folder (store/paths.py)."""
import os

import pytest

from store import durable
from store.paths import STATE_ENV, state_dir


def test_a_write_that_fails_midway_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "cache.bin"
    durable.write_atomic(path, b"old contents")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(durable.os, "fsync", full_disk)
    with pytest.raises(OSError):
        durable.write_atomic(path, b"new contents, cut short")
    assert path.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["cache.bin"]  # no temporary file left behind


def test_a_truncated_file_is_told_from_a_whole_one(tmp_path):
    path = durable.write_checked(tmp_path / "model.onnx", b"x" * 1000)
    assert durable.intact(path) and durable.read_checked(path) == b"x" * 1000
    with open(path, "r+b") as f:
        f.truncate(500)
    assert not durable.intact(path) and durable.read_checked(path) is None
    assert not durable.intact(tmp_path / "missing")


def test_the_permissions_asked_for_are_those_of_the_file(tmp_path):
    path = durable.write_atomic(tmp_path / "secret", "token", mode=0o600)
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_the_state_folder_is_apart_from_the_model_store(tmp_path, monkeypatch):
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(STATE_ENV, raising=False)
    assert state_dir() == (tmp_path / "home" / "effnet-state").resolve()
    monkeypatch.setenv(STATE_ENV, str(tmp_path / "state"))
    assert state_dir() == (tmp_path / "state").resolve()
    assert state_dir(tmp_path / "other") == (tmp_path / "other" / "effnet-state").resolve()


def test_a_folder_that_cannot_be_written_is_known(tmp_path):
    assert durable.writable(tmp_path / "new")
    assert not durable.writable("/proc/effnet-cannot-be-here")
    assert os.path.isdir(tmp_path / "new")
