"""Which worker replicas answer: a mark per replica, a periodic check of each, and a watch on each
process's exit.

Why: a killed worker's listening socket stays open under BentoML's supervisor, so calls to it are
accepted by the kernel and wait for their deadline instead of failing; and a stopped (hung) process
looks the same. So the gateway decides who answers:
- every `server.health_interval_s` it asks each replica for its status, with `server.health_timeout_s`
  to answer; no answer (unless a call to it succeeded within that time: busy is not hung), or a failed
  connection, marks the replica down; an answer marks it up again (a down replica is asked at the same
  pace: that is its probe back);
- a replica's status names its process id: the gateway opens a pidfd on it, and the event loop marks
  the replica down the moment that process exits, before any check or call would notice;
- a call that passes its deadline, or whose connection fails for good, marks its replica down too
  (service/dispatch.py);
- marking a replica down ends the calls in flight to it at once (their deadlines are moved to now), so
  their requests are answered 503 + Retry-After instead of waiting for a process that is gone.
A variant whose replicas are all down answers its own requests 503 at once (service/gateway.py), or
its route's fallback answers them (service/routing.py).
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from . import metrics

logger = logging.getLogger("effnet.gateway")

UNKNOWN, UP, DOWN = "unknown", "up", "down"


def pid_namespace() -> int | None:
    """This process's pid namespace: a worker's pid means something here only if it reports the same."""
    return _namespace("pid")


def net_namespace() -> int | None:
    """This process's network namespace: with the pid namespace, what "on the same host" means here."""
    return _namespace("net")


def _namespace(kind: str) -> int | None:
    try:
        return os.stat(f"/proc/self/ns/{kind}").st_ino
    except OSError:
        return None


@dataclass
class Replica:
    state: str = UNKNOWN  # unknown until its first check; calls may go to it meanwhile
    reason: str | None = None  # why it is down
    since: float = field(default_factory=time.monotonic)  # when the state last changed
    status: dict | None = None  # its last answer (service.workers.VariantRunner.status)
    answered: bool = False  # it has answered a check at least once
    pid: int | None = None  # its process, watched through `watch_fd`
    watch_fd: int | None = None
    calls: set = field(default_factory=set)  # the asyncio.Timeout of each call in flight to it
    called_at: float = 0.0  # when a call to it last succeeded (service/dispatch.py)
    address: str = ""  # where it is, for a replica elsewhere (service/remote_workers.py); "" for the gateway's own
    retired: bool = False  # its address no longer resolves: not called, not checked (kept so indexes stay put)

    @property
    def serving(self) -> bool:
        """Whether calls may go to it: not down, not retired, and not known to be unloaded."""
        return (self.state != DOWN and not self.retired
                and (self.status is None or bool(self.status.get("ready"))))

    def same_host(self, namespaces: tuple[int | None, int | None]) -> bool:
        """Whether it answered from this host's pid and network namespaces, where this process's shared memory
        can reach it (a worker in another pod, container or network namespace cannot be counted on to)."""
        st = self.status or {}
        return None not in namespaces and (st.get("pid_namespace"), st.get("net_namespace")) == namespaces


class Health:
    """The replicas of every variant, by index (`service.workers.worker_names` order)."""

    def __init__(self, counts: dict[str, int], check: Callable[[str, int], Awaitable[dict]], interval_s: float = 1.0,
                 timeout_s: float = 1.5, after_round: Callable[[], None] | None = None) -> None:
        self.replicas = {v: [Replica() for _ in range(n)] for v, n in counts.items()}
        self.check_fn = check  # (variant, index) -> its status; raises when it cannot be reached
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.after_round = after_round
        self.namespace = pid_namespace()
        self.namespaces = (self.namespace, net_namespace())  # Replica.same_host
        self.task: asyncio.Task | None = None
        self.rounds = 0

    # what the request path asks ---------------------------------------------------------------------

    def add(self, variant: str, address: str) -> int:
        """A new replica of `variant` at `address` (a worker elsewhere that just resolved): its index."""
        reps = self.replicas.setdefault(variant, [])
        reps.append(Replica(address=address))
        return len(reps) - 1

    def retire(self, variant: str, i: int, reason: str) -> None:
        """Replica `i` is gone from its variant's addresses: no calls, no checks, its calls in flight ended."""
        r = self.replicas[variant][i]
        if not r.retired:
            self.mark_down(variant, i, "retired", reason)
            r.retired = True

    def revive(self, variant: str, i: int) -> None:
        """Replica `i`'s address resolves again: checked again, and called once a check finds it up."""
        r = self.replicas[variant][i]
        if r.retired:
            r.retired, r.status = False, None

    def usable(self, variant: str) -> list[int]:
        return [i for i, r in enumerate(self.replicas.get(variant, [])) if r.serving]

    def is_down(self, variant: str) -> bool:
        """Every replica of the variant is marked down or retired (a variant without replicas never is)."""
        reps = self.replicas.get(variant)
        return bool(reps) and all(r.state == DOWN or r.retired for r in reps)

    def down_variants(self) -> frozenset[str]:
        return frozenset(v for v in self.replicas if self.is_down(v))

    def down_reason(self, variant: str) -> str:
        now = time.monotonic()
        r = min((r for r in self.replicas[variant] if r.state == DOWN or r.retired), key=lambda r: r.since)
        return f"{r.reason} ({now - r.since:.1f} s ago)"

    # marks ------------------------------------------------------------------------------------------

    def mark_down(self, variant: str, i: int, why: str, reason: str) -> None:
        """Mark replica `i` down: `why` is the metric's label, `reason` what clients and logs are told."""
        r = self.replicas[variant][i]
        if r.state == DOWN:
            return
        logger.warning("variant %s: worker replica %d is marked down: %s", variant, i + 1, reason)
        r.state, r.reason, r.since = DOWN, reason, time.monotonic()
        self._unwatch(r)
        metrics.REPLICA_UP.labels(variant, str(i + 1)).set(0)
        metrics.REPLICA_DOWN.labels(variant, why).inc()
        loop_now = asyncio.get_running_loop().time() if r.calls else 0.0
        for timeout in list(r.calls):  # the calls in flight end now (service/dispatch.py answers 503)
            if timeout.when() is None or timeout.when() > loop_now:
                timeout.reschedule(loop_now)

    def record(self, variant: str, i: int, status: dict) -> None:
        """Replica `i` answered its check with `status`: up, and its process watched."""
        r = self.replicas[variant][i]
        r.status, r.answered = status, True
        if r.state != UP:
            if r.state == DOWN:
                logger.warning("variant %s: worker replica %d answers again, after %.1f s down", variant, i + 1,
                               time.monotonic() - r.since)
            r.state, r.reason, r.since = UP, None, time.monotonic()
            metrics.REPLICA_UP.labels(variant, str(i + 1)).set(1)
        pid = status.get("pid")
        if pid != r.pid and isinstance(pid, int) and status.get("pid_namespace") == self.namespace is not None:
            self._watch(variant, i, pid)

    def _watch(self, variant: str, i: int, pid: int) -> None:
        """Mark replica `i` down when process `pid` exits (a pidfd is readable from then on)."""
        r = self.replicas[variant][i]
        self._unwatch(r)
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):  # an old kernel, or already gone: the checks still catch it
            return
        r.pid, r.watch_fd = pid, fd
        asyncio.get_running_loop().add_reader(
            fd, lambda: self.mark_down(variant, i, "exited", f"its worker process {pid} exited"))

    def _unwatch(self, r: Replica) -> None:
        if r.watch_fd is not None:
            try:
                asyncio.get_running_loop().remove_reader(r.watch_fd)
            except RuntimeError:  # no loop any more (shutting down)
                pass
            os.close(r.watch_fd)
        r.pid = r.watch_fd = None

    # checks -----------------------------------------------------------------------------------------

    async def check(self, variant: str, i: int) -> None:
        r, started = self.replicas[variant][i], time.monotonic()
        try:
            async with asyncio.timeout(self.timeout_s):
                status = await self.check_fn(variant, i)
        except TimeoutError:
            if r.called_at >= started:  # busy, not hung: it answered a call while this check waited
                logger.info("variant %s: worker replica %d was slow to answer its health check, but answers calls",
                            variant, i + 1)
                return
            self.mark_down(variant, i, "health_check", f"worker replica {i + 1} did not answer its health check "
                           f"within {self.timeout_s:g} s" if r.answered else
                           f"worker replica {i + 1} is not answering yet (starting)")
        except Exception as e:  # noqa: BLE001 - a connection refused, reset...: the replica cannot be reached
            logger.debug("variant %s: worker replica %d: its check failed: %r", variant, i + 1, e)
            self.mark_down(variant, i, "connection", f"worker replica {i + 1} cannot be reached "
                           f"({type(e).__name__})" if r.answered else
                           f"worker replica {i + 1} is not answering yet (starting)")
        else:
            self.record(variant, i, status)

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(v, i) for v, reps in self.replicas.items()
                               for i, r in enumerate(reps) if not r.retired))
        self.rounds += 1
        if self.after_round is not None:
            self.after_round()

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.check_all()
            except Exception:
                logger.exception("health check round failed")
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))

    def start(self) -> None:
        """Start the checks on the running event loop (once)."""
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self.run(), name="effnet-health")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        for reps in self.replicas.values():
            for r in reps:
                self._unwatch(r)
