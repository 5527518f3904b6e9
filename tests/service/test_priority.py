"""service/priority.py: a worker process makes every thread of its own nicer, those started before and
after the call, and the configuration bounds the value."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from service.config import ConfigError, parse_config

CHILD = textwrap.dedent("""
    import os, threading, time
    from service.priority import lower_priority

    def nice_of(tid):
        return os.getpriority(os.PRIO_PROCESS, tid)

    stop = threading.Event()
    before = threading.Thread(target=stop.wait)
    before.start()
    base = nice_of(0)
    changed = lower_priority(5)
    again = lower_priority(5)
    seen = {}
    after = threading.Thread(target=lambda: seen.setdefault("after", nice_of(threading.get_native_id())))
    after.start(); after.join()
    print(base, changed, again, nice_of(0), nice_of(before.native_id), seen["after"])
    stop.set(); before.join()
""")


def test_every_thread_is_nicer_once_and_new_threads_inherit_it():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, check=True)
    base, changed, again, main, before, after = map(int, out.stdout.split())
    want = min(19, base + 5)
    assert changed >= 2 and again == 0
    assert main == before == after == want


def test_zero_changes_nothing():
    out = subprocess.run([sys.executable, "-c", "import os; from service.priority import lower_priority; "
                          "b = os.getpriority(os.PRIO_PROCESS, 0); print(lower_priority(0), "
                          "os.getpriority(os.PRIO_PROCESS, 0) - b)"], capture_output=True, text=True, timeout=60,
                         check=True)
    assert out.stdout.split() == ["0", "0"]


def _config(**server):
    return {"server": server, "variants": {"b0": {"model": "b0-fashion-mnist"}},
            "routes": {"fashion": {"split": {"b0": 100}}}}


@pytest.mark.parametrize("key", ["worker_nice", "decode_nice"])
def test_nice_values_are_read_and_bounded(key):
    assert getattr(parse_config(_config()).server, key) == 5
    assert getattr(parse_config(_config(**{key: 0})).server, key) == 0
    for bad in (-1, 20, "high", 2.5):
        with pytest.raises(ConfigError, match=key):
            parse_config(_config(**{key: bad}))


def test_a_big_upload_is_decoded_on_a_nicer_thread_and_a_small_one_on_the_loop():
    """service/decode.py: the thread that decodes a big image is decode_nice nicer than the event loop's."""
    import asyncio
    import io
    import threading
    import types

    from PIL import Image

    from service import decode

    seen = {}
    real = decode.Decoder._pixels

    def spy(self, img, variant, data=None):
        tid = threading.get_native_id()
        seen.setdefault("sizes", []).append((img.size, os.getpriority(os.PRIO_PROCESS, tid), tid))
        return real(self, img, variant, data)

    def png(side):
        buf = io.BytesIO()
        Image.new("RGB", (side, side), (200, 10, 10)).save(buf, "PNG")
        return buf.getvalue()

    d = decode.Decoder({"b0": types.SimpleNamespace(resolution=32, resize=None)}, 40_000_000, 100_000_000, nice=3)
    decode.Decoder._pixels = spy
    try:
        async def main():
            base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
            await d.prepare(png(64), "b0")
            await d.prepare(png(600), "b0")
            return base, threading.get_native_id()
        base, loop_tid = asyncio.run(main())
    finally:
        decode.Decoder._pixels = real
    (small, small_nice, small_tid), (big, big_nice, big_tid) = seen["sizes"]
    assert small_tid == loop_tid and small_nice == base
    assert big_tid != loop_tid and big_nice == min(19, base + 3)
    assert os.getpriority(os.PRIO_PROCESS, loop_tid) == base
