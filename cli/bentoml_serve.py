"""`python -m cli.bentoml_serve ...`: `bentoml serve`, with its Unix sockets kept until its processes stop,
and a crashed worker restarted within half a second.

BentoML's arbiter removes the folder of its workers' Unix sockets as the first step of stopping,
before it signals the processes (`bentoml._internal.utils.circus.Arbiter.stop`). The workers then
drain (service/drain.py) behind a path that no longer exists, and every new connection the gateway
opens to them for the requests it admitted fails. Here the folder is removed once the arbiter's loop
has ended, after every process has stopped.

BentoML's arbiter also looks for dead processes only every 10 s (`check_delay=10` in
`create_standalone_arbiter`), so a killed worker came back 0.5 to 10 s later, and a variant's recovery
after a crash ranged from 7 to 16 s (the chaos runs in benchmarks/RESULTS.md). Here it looks every
`RESPAWN_CHECK_S`, and a tick that finds the arbiter busy with a command of its own (starting the
watchers, stopping) is skipped, not failed: that conflict is why BentoML chose 10 s. Processes are
respawned inside containers too (BentoML turns respawning off when BENTOML_CONTAINERIZED is set,
which would leave a crashed variant down until the whole pod is replaced).
"""
from __future__ import annotations


def keep_sockets_until_stopped() -> None:
    from bentoml._internal.utils import circus as bentoml_circus
    from circus.arbiter import Arbiter as CircusArbiter

    arbiter = bentoml_circus.Arbiter
    if getattr(arbiter, "_effnet_sockets_kept", False):
        return
    start = arbiter.start

    def start_then_clean_up(self, cb=None):
        try:
            start(self, cb)
        finally:
            self.exit_stack.__exit__(None, None, None)

    def stop(self):
        return CircusArbiter.stop(self)  # without BentoML's early clean-up: start_then_clean_up does it

    arbiter.start, arbiter.stop, arbiter._effnet_sockets_kept = start_then_clean_up, stop, True


RESPAWN_CHECK_S = 0.5


def respawn_promptly(check_s: float = RESPAWN_CHECK_S) -> None:
    from bentoml._internal.utils import circus as bentoml_circus
    from circus.arbiter import Arbiter as CircusArbiter
    from circus.watcher import Watcher

    arbiter = bentoml_circus.Arbiter
    if getattr(arbiter, "_effnet_respawn_s", None) is not None:
        return
    init, manage = arbiter.__init__, CircusArbiter.manage_watchers

    def init_checking_often(self, *args, **kwargs):
        kwargs["check_delay"] = check_s  # read by the controller built in __init__, not later
        init(self, *args, **kwargs)

    def manage_unless_busy(self):
        if self._restarting or self._exclusive_running_command is not None:
            return None  # the next tick comes check_s later
        return manage(self)

    watcher_init = Watcher.__init__

    def watcher_respawning(self, *args, **kwargs):
        kwargs["respawn"] = True
        watcher_init(self, *args, **kwargs)

    arbiter.__init__, arbiter.manage_watchers, arbiter._effnet_respawn_s = init_checking_often, manage_unless_busy, check_s
    Watcher.__init__ = watcher_respawning


if __name__ == "__main__":
    keep_sockets_until_stopped()
    respawn_promptly()
    from bentoml_cli.cli import cli

    cli()
