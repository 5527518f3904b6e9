"""loadtest/chaos_faults.py: a damaged cache file for the length of a scenario, put back afterwards with
its recorded size and hash, unless the service rebuilt it whole."""
from __future__ import annotations

import time

from loadtest import chaos_faults as faults
from loadtest.chaos_scenarios import _whole_again
from store.durable import intact, record, write_checked


def test_a_truncated_file_is_put_back_whole_with_its_sidecar(tmp_path):
    path = tmp_path / "model.int8.onnx"
    path.write_bytes(b"x" * 1000)  # no sidecar yet: a file from before they were recorded
    with faults.truncated(path) as cut:
        assert path.stat().st_size == cut["truncated_to"] == 500
        assert _whole_again(path, time.time() + 0.3) is None
    assert path.read_bytes() == b"x" * 1000 and intact(path)


def test_a_file_the_service_rebuilt_is_kept(tmp_path):
    path = tmp_path / "model.int8.onnx"
    write_checked(path, b"old" * 100)
    with faults.truncated(path):
        assert not intact(path)
        path.write_bytes(b"rebuilt")
        record(path)  # what the service's export does
        assert _whole_again(path, time.time() + 5) is not None
    assert path.read_bytes() == b"rebuilt" and intact(path)
