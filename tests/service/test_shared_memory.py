"""Shared-memory batches between the gateway and its workers (service/shm.py), without a server.

The worker's side maps the arena through /proc/<pid>/fd/<fd> as it does from another process."""
import asyncio
import gc
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from service.shm import COLUMNS, Arena, ArenaMissing, ArenaReader, StaleBatch


def batch(n, shape=(3, 16, 16), seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def test_a_batch_comes_back_as_written_and_in_place():
    arena = Arena("lite0", 8, (3, 16, 16), slots=2)
    b = batch(5)
    lease = arena.put(b)
    assert lease.refs.shape == (5, COLUMNS) and lease.refs.dtype == np.int64
    images, verify = ArenaReader("lite0").gather(lease.refs)
    assert np.array_equal(images, b)
    verify()
    arena.data[lease.slot, 4, 2, 7, 7] = 255 - b[4, 2, 7, 7]  # the worker reads the gateway's pages, no copy
    assert images[4, 2, 7, 7] == 255 - b[4, 2, 7, 7]


def test_references_from_several_calls_are_gathered_in_their_order():
    """BentoML's batcher concatenates the references of the calls it merges, as it would their pixels."""
    arena = Arena("lite0", 8, (3, 16, 16), slots=3)
    a, b = batch(3, seed=1), batch(2, seed=2)
    la, lb = arena.put(a), arena.put(b)
    refs = np.concatenate([lb.refs, la.refs[::-1]])
    images, verify = ArenaReader("lite0").gather(refs)
    assert np.array_equal(images, np.concatenate([b, a[::-1]]))
    verify()


def test_a_rewritten_slot_is_never_read_as_the_old_batch():
    arena = Arena("b0", 4, (3, 16, 16), slots=1)
    lease = arena.put(batch(2, seed=1))
    reader = ArenaReader("b0")
    _, verify = reader.gather(lease.refs)
    lease.release(answered=True)
    again = arena.put(batch(2, seed=2))
    assert again is not None and again.slot == lease.slot
    with pytest.raises(StaleBatch):
        verify()  # rewritten while "its inference ran"
    with pytest.raises(StaleBatch):
        reader.gather(lease.refs)  # a late call with the old references
    images, _ = reader.gather(again.refs)
    assert np.array_equal(images, batch(2, seed=2))


@pytest.mark.parametrize("case", ["full", "too many images", "other shape", "other dtype", "empty"])
def test_a_batch_that_does_not_fit_is_left_to_the_body(case):
    arena = Arena("b0", 4, (3, 16, 16), slots=1)
    if case == "full":
        assert arena.put(batch(1)) is not None
    b = {"too many images": batch(5), "other shape": batch(2, (3, 8, 8)), "empty": batch(0),
         "other dtype": batch(2).astype(np.float32)}.get(case, batch(2))
    assert arena.put(b) is None


def test_a_slot_whose_call_went_unanswered_waits_before_reuse():
    """The worker may still be reading it (a timeout, a lost connection): not reused until quarantine_s."""
    async def scenario():
        arena = Arena("b0", 4, (3, 16, 16), slots=1, quarantine_s=0.2)
        arena.put(batch(1)).release(answered=False)
        assert arena.put(batch(1)) is None
        await asyncio.sleep(0.3)
        lease = arena.put(batch(1))
        assert lease is not None
        lease.release(answered=True)
        assert arena.put(batch(1)) is not None

    asyncio.run(scenario())


def shifted(column, by):
    def change(refs):
        refs = refs.copy()
        refs[0, column] += by
        return refs
    return change


@pytest.mark.parametrize("make, problem", [
    (lambda good: good[:, :4], "shape"),
    (lambda good: good[:0], "shape"),
    (lambda good: good.astype(np.float32), "int64"),
    (shifted(3, 7), "outside the arena"),  # slot
    (shifted(4, 4), "outside the arena"),  # row
    (shifted(4, -1), "outside the arena"),
])
def test_malformed_references_are_refused(make, problem):
    arena = Arena("b0", 4, (3, 16, 16), slots=1)
    good = arena.put(batch(1)).refs
    with pytest.raises(ValueError, match=problem):
        ArenaReader("b0").gather(make(good))


def test_only_the_arena_the_call_names_and_of_the_workers_own_variant_is_mapped(tmp_path):
    """References carry numbers only; the arena's header must carry the token and the worker's variant."""
    lease = Arena("b0", 4, (3, 16, 16), slots=1).put(batch(1))
    with pytest.raises(ArenaMissing, match="not the arena of variant 'mec'"):
        ArenaReader("mec").gather(lease.refs)
    wrong_token = lease.refs.copy()
    wrong_token[:, 2] += 1
    with pytest.raises(ArenaMissing, match="not the arena"):
        ArenaReader("b0").gather(wrong_token)
    other = tmp_path / "other"
    other.write_bytes(bytes(4096))  # an open file of this process that is not an arena
    with open(other, "rb") as f:
        not_an_arena = lease.refs.copy()
        not_an_arena[:, 1] = f.fileno()
        with pytest.raises(ArenaMissing):
            ArenaReader("b0").gather(not_an_arena)
    gone = lease.refs.copy()
    gone[:, 0] = 2**31 - 1  # above any pid_max: no such process, as for a gateway on another host
    with pytest.raises(ArenaMissing, match="cannot be opened here"):
        ArenaReader("b0").gather(gone)


@pytest.mark.server
def test_another_process_reads_the_batch_and_nothing_outlives_the_gateway():
    """The worker is another process; a memfd has no name, so no file is left when the gateway goes
    (BentoML stops its processes without running their exit handlers)."""
    arena = Arena("lite0", 2, (3, 8, 8), slots=1)
    b = batch(2, (3, 8, 8))
    refs = arena.put(b).refs
    code = ("import sys, numpy as np; from service.shm import ArenaReader; "
            f"refs = np.array({refs.tolist()}, np.int64); images, verify = ArenaReader('lite0').gather(refs); "
            "verify(); sys.stdout.write(images.tobytes().hex())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])  # the repository root
    assert bytes.fromhex(out.stdout) == b.tobytes()
    link = os.readlink(arena.path)
    assert link.startswith("/memfd:effnet-batch-lite0")  # no file system name to clean up
    fd = arena.fd
    del arena, refs
    gc.collect()
    assert not os.path.exists(f"/proc/self/fd/{fd}") or not os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:effnet")
