"""Core slots (service/cpu_slots.py): the thread budget shared by worker processes, and elastic threads."""
from __future__ import annotations

import multiprocessing as mp
import os
import time

import pytest

from service.cpu_slots import CoreSlots


def hold_in_child(folder, n, k, seconds, ready, done):
    """Another worker process: holds `k` of the `n` slots for `seconds`."""
    slots = CoreSlots(n, folder)
    with slots.hold(k) as got:
        assert got == k
        ready.set()
        time.sleep(seconds)
        done.set()  # before giving the slots back, so a waiter that got one can check it


def child(folder, n, seconds, k=1):
    ctx = mp.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    p = ctx.Process(target=hold_in_child, args=(folder, n, k, seconds, ready, done))
    p.start()
    assert ready.wait(30)
    return p, done


def test_an_idle_machine_gives_a_batch_every_slot(tmp_path):
    slots = CoreSlots(2, tmp_path)
    with slots.hold(2) as got:
        assert got == 2
    with slots.hold(1) as got:  # a variant configured with one thread takes one
        assert got == 1
    with slots.hold(5) as got:  # never more than there are
        assert got == 2


@pytest.mark.server  # other processes hold the slots
def test_a_busy_machine_gives_one_slot_and_stays_single_threaded_for_a_while(tmp_path):
    slots = CoreSlots(2, tmp_path, contended_s=0.5)
    p, done = child(tmp_path, 2, 0.3)  # another process runs a single-thread batch
    with slots.hold(2) as got:
        assert got == 1  # the free slot only: two single-thread batches side by side
    p.join()
    assert done.is_set()
    with slots.hold(2) as got:  # everything is free again, but it was busy a moment ago
        assert got == 1
    time.sleep(0.6)
    with slots.hold(2) as got:  # quiet for longer than the window: the whole machine again
        assert got == 2


@pytest.mark.server  # other processes hold the slots
def test_with_every_slot_taken_a_batch_waits_for_one(tmp_path):
    slots = CoreSlots(2, tmp_path)
    p, done = child(tmp_path, 2, 0.4, k=2)
    with slots.hold(2) as got:
        assert done.is_set() and got >= 1  # it ran only after the other released both
    p.join()


def hammer(folder, n, rounds, log):
    slots = CoreSlots(n, folder, contended_s=0.01)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    for _ in range(rounds):
        with slots.hold(n) as got:
            os.write(fd, f"+{got}\n".encode())
            time.sleep(0.002)
            os.write(fd, f"-{got}\n".encode())
    os.close(fd)


@pytest.mark.server  # other processes hold the slots
def test_threads_in_use_across_processes_never_exceed_the_slots(tmp_path):
    """Four processes with elastic batches on 2 slots: the threads held at any moment stay <= 2."""
    log = tmp_path / "log"
    log.touch()
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=hammer, args=(tmp_path / "slots", 2, 60, log)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    in_use, peak, sizes = 0, 0, set()
    for line in log.read_text().split():
        in_use += int(line)  # "+k" on taking k slots, "-k" on giving them back, in the order they happened
        peak = max(peak, in_use)
        sizes.add(abs(int(line)))
    assert in_use == 0 and peak <= 2 and 1 in sizes


def test_no_slots_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        CoreSlots(0, tmp_path)


@pytest.mark.server  # another process holds the slots
def test_a_stopped_worker_holding_every_slot_does_not_stall_the_others(tmp_path):
    slots = CoreSlots(2, tmp_path, max_wait_s=0.3)
    p, done = child(tmp_path, 2, 60, k=2)  # holds both slots far longer than any batch: stopped or hung
    try:
        with slots.hold(2) as got:
            assert not done.is_set() and got == 1  # ran while the other still holds both: one thread, no slot
        assert slots.unslotted == 1
        with slots.hold(1) as got:  # still stuck: the next batch does not wait the whole time again
            assert got == 1 and not done.is_set()
        assert slots.unslotted == 2
    finally:
        p.terminate()
        p.join()
    with slots.hold(2) as got:  # the holder is gone: its locks died with it
        assert got >= 1
    assert slots.unslotted == 2
