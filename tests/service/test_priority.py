"""service/priority.py: a worker process makes every thread of its own nicer, those started before and
after the call, and the configuration bounds the value."""
from __future__ import annotations

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


def test_worker_nice_is_read_and_bounded():
    assert parse_config(_config()).server.worker_nice == 5
    assert parse_config(_config(worker_nice=0)).server.worker_nice == 0
    for bad in (-1, 20, "high", 2.5):
        with pytest.raises(ConfigError, match="worker_nice"):
            parse_config(_config(worker_nice=bad))
