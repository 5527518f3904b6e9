"""`python -m cli.bentoml_serve ...`: `bentoml serve`, with its Unix sockets kept until its processes stop.

BentoML's arbiter removes the folder of its workers' Unix sockets as the first step of stopping,
before it signals the processes (`bentoml._internal.utils.circus.Arbiter.stop`). The workers then
drain (service/drain.py) behind a path that no longer exists, and every new connection the gateway
opens to them for the requests it admitted fails. Here the folder is removed once the arbiter's loop
has ended, after every process has stopped; nothing else of BentoML's changes.
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


if __name__ == "__main__":
    keep_sockets_until_stopped()
    from bentoml_cli.cli import cli

    cli()
