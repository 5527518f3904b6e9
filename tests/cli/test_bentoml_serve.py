"""cli/bentoml_serve.py: BentoML's arbiter, as `effnet serve` runs it, looks for dead workers every
RESPAWN_CHECK_S instead of 10 s, skips a tick while it runs a command of its own, respawns inside
containers too, and keeps its sockets' folder until it has stopped. Checked on BentoML's own classes,
in a child process so that this one's stay as BentoML made them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import json
    from cli.bentoml_serve import RESPAWN_CHECK_S, keep_sockets_until_stopped, respawn_promptly
    from bentoml._internal.utils.circus import create_standalone_arbiter
    from bentoml.serving import create_watcher

    keep_sockets_until_stopped(); respawn_promptly(); respawn_promptly()
    w = create_watcher("w", ["-c", "pass"])
    a = create_standalone_arbiter([w])
    out = {"check": a.check_delay, "ctrl_ms": a.ctrl.check_delay, "want": RESPAWN_CHECK_S, "respawn": w.respawn}
    a._exclusive_running_command = "start_watchers"
    out["busy_tick"] = repr(a.manage_watchers())
    a._exclusive_running_command = None
    out["kept"] = bool(getattr(type(a), "_effnet_sockets_kept", False))
    print(json.dumps(out))
""")


def test_arbiter_checks_often_skips_busy_ticks_and_respawns_in_containers():
    env = {**os.environ, "BENTOML_CONTAINERIZED": "true", "BENTOML_DO_NOT_TRACK": "true"}
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["check"] == out["want"] < 10
    assert out["ctrl_ms"] == out["want"] * 1000  # the controller's periodic check is what respawns
    assert out["respawn"] is True  # BentoML alone: False with BENTOML_CONTAINERIZED
    assert out["busy_tick"] == "None"  # not a ConflictError
    assert out["kept"] is True


def test_bentoml_alone_would_not_respawn_in_a_container():
    """The control: without the wrapper, BentoML's watcher does not respawn under BENTOML_CONTAINERIZED,
    and its arbiter checks every 10 s; the test above would catch either coming back."""
    code = ("import json; from bentoml.serving import create_watcher; "
            "from bentoml._internal.utils.circus import create_standalone_arbiter; "
            "w = create_watcher('w', ['-c', 'pass']); a = create_standalone_arbiter([w]); "
            "print(json.dumps([w.respawn, a.check_delay, a.ctrl.check_delay]))")
    env = {**os.environ, "BENTOML_CONTAINERIZED": "true", "BENTOML_DO_NOT_TRACK": "true"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == [False, 10, 10000]
