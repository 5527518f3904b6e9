"""Batches handed from the gateway to a worker process through shared memory, not the HTTP body.

Why: a batch of eight 224x224 images is 1.2 MB. Sent in the body of the gateway -> worker call, it
was pickled, written to the socket, read back by the worker in 64 kB pieces (uvicorn's flow control),
each piece a trip through the worker's event loop, then joined and copied again by BentoML's batcher:
5% of the machine at 32 clients, a third of it memmove (benchmarks/serving.md).

How (the idea of Triton's system shared memory, for one host):
- The gateway owns one arena per variant: an anonymous memory file (memfd) of `slots` batches of up to
  `capacity` images of one shape, mapped in its process. A call takes a free slot, bumps the slot's
  generation, copies the batch in, and sends the worker only references, int64 rows (pid, fd, token,
  slot, row, generation): BentoML's batcher still merges the calls that meet in the worker, row by row.
- The worker maps the arena through /proc/<pid>/fd/<fd> (a path made of the two numbers, never one
  from the call), checks that its header names the worker's own variant and the token, checks each
  row's generation, and reads the images in place. It checks the generations again after inference:
  a slot rewritten meanwhile fails the call.
- A slot is reused only once its call has returned. A call that failed without an answer (timeout,
  lost connection, cancelled) may still be read by the worker, so its slot waits `quarantine_s`.
- Where an arena cannot be made or mapped (no memfd, a worker on another host or in another
  container), the gateway logs it once and sends that variant's batches in the HTTP body, as
  `worker_transport: http` does.
- A memfd, not a named file in /dev/shm: BentoML stops its processes without running their exit
  handlers, so a named file would outlive every stop. A memfd has no name: its memory goes when the
  last process that maps it does.
"""
from __future__ import annotations

import asyncio
import mmap
import os
import secrets
import struct
import weakref
import zlib
from collections import OrderedDict
from typing import Callable

import numpy as np

MAGIC = 0x4546_4E5F_4241_5443  # "EFN_BATC"
VERSION = 2
HEAD = 9  # int64 words before the generations: magic, version, slots, capacity, C, H, W, token, variant
COLUMNS = 6  # a reference: gateway pid, arena fd, arena token, slot, row, generation


class ArenaMissing(LookupError):
    """The worker cannot map the arena a call names (another host, or the arena is gone)."""


class StaleBatch(RuntimeError):
    """A referenced slot holds another batch than the one the call was sent with."""


def variant_id(variant: str) -> int:
    """The variant an arena is for, as the header records it (a worker maps only its own variant's)."""
    return zlib.crc32(variant.encode())


def _page(n: int) -> int:
    return -(-n // mmap.PAGESIZE) * mmap.PAGESIZE


class Lease:
    """One slot holding one call's batch; `refs` is what the call sends instead of the pixels."""

    def __init__(self, arena: "Arena", slot: int, refs: np.ndarray) -> None:
        self.arena, self.slot, self.refs = arena, slot, refs

    def release(self, answered: bool) -> None:
        """Give the slot back: at once if the worker answered, after `quarantine_s` if it may still read."""
        self.arena._give_back(self.slot, answered)


class Arena:
    """The gateway's side: `slots` batches of up to `capacity` uint8 images of `shape` (C, H, W)."""

    def __init__(self, variant: str, capacity: int, shape: tuple[int, int, int], slots: int,
                 quarantine_s: float = 65.0) -> None:
        if capacity < 1 or slots < 1 or len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"bad arena geometry: {slots} slots of {capacity} x {shape}")
        self.variant, self.capacity, self.shape, self.slots = variant, capacity, tuple(int(s) for s in shape), slots
        self.quarantine_s = quarantine_s
        self.pid, self.token = os.getpid(), secrets.randbits(62)
        slot_bytes = capacity * int(np.prod(self.shape))
        offset = _page(8 * (HEAD + slots))
        size = offset + slots * slot_bytes
        if not hasattr(os, "memfd_create"):
            raise OSError("this system has no memfd_create")
        # Kept open for the arena's life: workers open it as /proc/<pid>/fd/<fd>. Not inherited by children.
        self.fd = os.memfd_create(f"effnet-batch-{variant}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.mm = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        self.path = f"/proc/{self.pid}/fd/{self.fd}"
        self.header = np.frombuffer(self.mm, np.int64, HEAD + slots)
        self.data = np.frombuffer(self.mm, np.uint8, slots * slot_bytes, offset).reshape(slots, capacity, *self.shape)
        self.header[:HEAD] = [MAGIC, VERSION, slots, capacity, *self.shape, self.token, variant_id(variant)]
        self.free = list(range(slots - 1, -1, -1))
        self._closer = weakref.finalize(self, os.close, self.fd)

    def put(self, batch: np.ndarray) -> Lease | None:
        """Copy `batch` (N, C, H, W) uint8 into a free slot; None if it does not fit or none is free
        (the caller then sends the batch in the body)."""
        n = len(batch)
        if (not self.free or not 0 < n <= self.capacity or batch.dtype != np.uint8
                or tuple(batch.shape[1:]) != self.shape):
            return None
        slot = self.free.pop()
        generation = int(self.header[HEAD + slot]) + 1
        self.header[HEAD + slot] = generation  # before the pixels: a reader still on the old batch sees it
        self.data[slot, :n] = batch
        refs = np.empty((n, COLUMNS), np.int64)
        refs[:, 0], refs[:, 1], refs[:, 2], refs[:, 3], refs[:, 5] = self.pid, self.fd, self.token, slot, generation
        refs[:, 4] = np.arange(n)
        return Lease(self, slot, refs)

    def _give_back(self, slot: int, answered: bool) -> None:
        if answered:
            self.free.append(slot)
            return
        try:
            asyncio.get_running_loop().call_later(self.quarantine_s, self.free.append, slot)
        except RuntimeError:  # no loop (tests, shutdown): the slot is simply not reused
            pass

    def close(self) -> None:
        """Close the gateway's descriptor; the memory goes once no worker maps it any more."""
        self._closer()


class ArenaReader:
    """A worker's side: maps the arenas of `variant` that calls name, and reads their batches in place."""

    def __init__(self, variant: str, keep: int = 4) -> None:
        self.variant, self.keep = variant, keep
        self.maps: OrderedDict[tuple[int, int, int], tuple[mmap.mmap, np.ndarray, np.ndarray]] = OrderedDict()

    def _arena(self, pid: int, fd: int, token: int) -> tuple[np.ndarray, np.ndarray]:
        key = (pid, fd, token)
        if key in self.maps:
            self.maps.move_to_end(key)
            return self.maps[key][1:]
        path = f"/proc/{int(pid)}/fd/{int(fd)}"
        try:
            f = os.open(path, os.O_RDWR)
        except OSError as e:  # gone, another host or PID namespace, or not ours to open
            raise ArenaMissing(f"shared-memory batch {path} cannot be opened here ({e.strerror})") from None
        try:
            size = os.fstat(f).st_size
            if size < 8 * HEAD:
                raise ArenaMissing(f"{path} is not a batch arena ({size} bytes)")
            # Read and write, though only read: torch and the engines take writable arrays without a warning.
            mm = mmap.mmap(f, size)
        finally:
            os.close(f)
        magic, version, slots, capacity, c, h, w, arena_token, arena_variant = struct.unpack_from(f"={HEAD}q", mm, 0)
        geometry = min(slots, capacity, c, h, w) > 0
        if magic != MAGIC or version != VERSION or not geometry or size < _page(8 * (HEAD + slots)) + slots * capacity * c * h * w:
            mm.close()
            raise ArenaMissing(f"{path} is not a batch arena of this version")
        if arena_token != token or arena_variant != variant_id(self.variant):
            mm.close()
            raise ArenaMissing(f"{path} is not the arena of variant {self.variant!r} that the call names")
        header = np.frombuffer(mm, np.int64, HEAD + slots)
        data = np.frombuffer(mm, np.uint8, slots * capacity * c * h * w, _page(8 * (HEAD + slots)))
        self.maps[key] = (mm, header, data.reshape(slots, capacity, c, h, w))
        while len(self.maps) > self.keep:  # arenas of gateways that restarted
            self.maps.popitem(last=False)
        return self.maps[key][1:]

    def gather(self, refs: np.ndarray) -> tuple[np.ndarray, Callable[[], None]]:
        """The images that `refs` name (a view when they are one slot's first rows in order, the usual
        call; else a copy), and a check to run after inference that raises StaleBatch if any of their
        slots was rewritten meanwhile. Raises ValueError for malformed references, ArenaMissing,
        StaleBatch."""
        refs = np.asarray(refs)
        if refs.ndim != 2 or refs.shape[1] != COLUMNS or len(refs) == 0 or refs.dtype.kind not in "iu":
            raise ValueError(f"expected int64 references of shape (N, {COLUMNS}), got {refs.dtype} {refs.shape}")
        # vectorised per arena, not a loop per row: a fashion batch is 32 rows of 3 kB images.
        parts, checks = [], []
        keys = refs[:, :3]
        one_arena = bool((keys == keys[0]).all())  # the usual case: one gateway process
        for pid, fd, token in ([keys[0].tolist()] if one_arena else np.unique(keys, axis=0).tolist()):
            mine = slice(None) if one_arena else np.flatnonzero((keys == (pid, fd, token)).all(axis=1))
            header, data = self._arena(pid, fd, token)
            slots, rows, gens = refs[mine, 3], refs[mine, 4], refs[mine, 5]
            if slots.min() < 0 or slots.max() >= data.shape[0] or rows.min() < 0 or rows.max() >= data.shape[1]:
                raise ValueError(f"references to slots {sorted(set(slots.tolist()))}, rows up to {rows.max()} "
                                 f"outside the arena ({data.shape[0]} x {data.shape[1]})")
            if (slots == slots[0]).all():  # the usual case: one call's batch
                used, want, same = slots[:1], gens[:1], bool((gens == gens[0]).all())
            else:
                used, first = np.unique(slots, return_index=True)
                want = gens[first]
                same = np.array_equal(gens, want[np.searchsorted(used, slots)])
            if not same or not np.array_equal(header[HEAD + used], want):
                raise StaleBatch(f"slots {used.tolist()} no longer hold the batches the call was sent with")
            parts.append((mine, data, slots, rows))
            checks.append((header, HEAD + used, want))
        if len(parts) == 1 and len(checks[0][2]) == 1 and np.array_equal(refs[:, 4], np.arange(len(refs))):
            _, data, slots, _ = parts[0]
            images = data[int(slots[0]), :len(refs)]
        else:
            images = np.empty((len(refs), *parts[0][1].shape[2:]), np.uint8)
            for mine, data, slots, rows in parts:
                images[mine] = data[slots, rows]

        def verify() -> None:
            for header, at, want in checks:
                if not np.array_equal(header[at], want):
                    raise StaleBatch("a slot was rewritten while its batch ran")

        return images, verify

    def close(self) -> None:
        for mm, *_ in self.maps.values():
            try:
                mm.close()
            except BufferError:  # an array still views it; the mapping goes with the process
                pass
        self.maps.clear()
