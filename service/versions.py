"""Several versions of a variant at once: load one while serving, give it a share (a canary), promote it,
roll back, unload it. No restart.

A variant's configured checkpoint is its first version, served by the workers the gateway starts (or
its `workers_at`). Another version (a store tag of the same input and classes) is loaded into worker
processes of its own, which the gateway starts (`python -m cli.worker VARIANT --model TAG` on
127.0.0.1, its batches through shared memory) and reaches as replicas of a key of its own,
`VARIANT@TAG`, with the same health checks, deadlines and retries as any worker (service/remote_workers.py).

- **Traffic.** Each version that is not the default has a share of the variant's requests; the default
  (the configured version until another is promoted) takes the rest. A request draws its version by
  share after routing, so the split between variants and the split between versions compose. A
  version takes traffic only while it is ready: one that is loading, failed its checks (sha256,
  classes, input), or whose replicas are all down, gives its share back to the default.
- **Promote** makes a version the default (the others' shares drop to 0, the old default stays loaded);
  **rollback** makes the previous default the default again and drops every share: one call.
- **Unload** drains a version that takes no traffic (its calls in flight finish), then stops its processes.
- Every change is written to the audit log and to a state file: after a restart, the gateway loads the
  same versions again, and they take their shares back once ready.
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import json
import logging
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from store.durable import write_atomic
from store.paths import state_dir

from .errors import ClientError
from .health import UP

logger = logging.getLogger("effnet.gateway")

SEP = "@"  # VARIANT@TAG: a loaded version's key in the dispatcher
LOAD_TIMEOUT_S = 600.0  # a version not ready after this (its engine export included) has failed
DRAIN_TIMEOUT_S = 60.0  # an unloaded version's calls in flight get this long to finish
INPUT_FIELDS = ("classes", "resolution", "resize", "in_chans", "grayscale")  # what the gateway's decoding assumes
ROOT = Path(__file__).resolve().parents[1]  # where `cli/` is: the worker's command runs from here


# The version a request names (the Open Inference Protocol's /v2/models/M/versions/V/infer), else None: a
# context variable, so that it reaches the dispatcher through whatever the request path calls in between.
PINNED: contextvars.ContextVar[str | None] = contextvars.ContextVar("effnet_pinned_version", default=None)


def short(tag: str) -> str:
    """The version part of a store tag: what the Open Inference Protocol calls the model's version."""
    return tag.split(":", 1)[-1]


def _top1(manifest: Any) -> float | None:
    return (getattr(manifest, "metrics", None) or {}).get("top1")


def base_of(key: str) -> str:
    """The variant of a dispatcher key (`b0`, or `b0@b0-fashion-mnist:v2`)."""
    return key.split(SEP, 1)[0]


@dataclass
class Version:
    tag: str  # the exact store tag, name:version
    key: str  # the dispatcher's key: the variant itself for the configured version, VARIANT@TAG otherwise
    configured: bool = False  # the configuration's own checkpoint, served by the gateway's workers
    share: float = 0.0  # of the variant's requests, while not the default (0..1)
    state: str = "ready"  # loading, ready, failed, draining
    error: str | None = None
    port: int | None = None
    proc: subprocess.Popen | None = None
    since: float = 0.0  # when the state last changed (time.time)
    top1: float | None = None  # its checkpoint's test top-1 (the manifest's)
    images: int = 0  # answered by it since it was loaded

    def row(self, default: str, ready: bool) -> dict:
        return {"tag": self.tag, "version": short(self.tag), "configured": self.configured,
                "default": self.tag == default, "share": round(self.share, 4) if self.tag != default else None,
                "state": self.state if self.state != "ready" or ready else "down", "error": self.error,
                "offline_top1": self.top1, "images": self.images, "port": self.port,
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.since))}


@dataclass
class VariantVersions:
    versions: dict[str, Version]  # by tag, the configured one first
    default: str  # the tag that takes what the shares leave
    previous: str | None = None  # the default before the last promote: what rollback returns to


def state_file(config_source: str) -> Path:
    """The versions saved for one configuration file, in the state folder."""
    digest = hashlib.sha256(str(config_source).encode()).hexdigest()[:12]
    return state_dir() / f"versions-{digest}.json"


class Versions:
    """Every variant's versions; `choose` is on the request path, the rest are admin actions."""

    def __init__(self, configured: dict[str, str], manifests: dict[str, Any], dispatcher: Any, config_source: str,
                 token: str, usable: Callable[[str], bool], rng: random.Random | None = None) -> None:
        self.by_variant = {v: VariantVersions({tag: Version(tag, v, configured=True, since=time.time(),
                                                            top1=_top1(manifests.get(v)))}, tag)
                           for v, tag in configured.items()}
        self.manifests = manifests
        self.dispatcher = dispatcher  # adds and removes the keys' replicas (service/dispatch.py)
        self.source = config_source
        self.file = state_file(config_source)
        self.token = token  # what the versions' workers ask of their callers (service/worker_app.py)
        self.usable = usable  # key -> whether a replica of it serves now
        self.rng = rng or random.Random()
        self.tasks: set[asyncio.Task] = set()

    # the request path -----------------------------------------------------------------------------------

    def choose(self, variant: str) -> tuple[str, str]:
        """The (key, tag) that answers a request for `variant`: the version the request names (`PINNED`, the
        Open Inference Protocol's /versions/V/), else one drawn by share among those that serve now, else
        the default, else the configured version."""
        vv = self.by_variant.get(variant)
        if vv is None:
            return variant, ""
        if (pinned := PINNED.get()) is not None:
            v = self.find(variant, pinned)
            if not self._serves(v):
                raise ClientError(f"version {v.tag!r} of {variant!r} is {v.state if v.state != 'ready' else 'down'}; "
                                  "retry later", 503, {"Retry-After": "1"})
            return v.key, v.tag
        if len(vv.versions) > 1:
            r, acc = self.rng.random(), 0.0
            for v in vv.versions.values():
                if v.tag == vv.default or v.share <= 0:
                    continue
                acc += v.share
                if r < acc:
                    if self._serves(v):
                        return v.key, v.tag
                    break
            d = vv.versions[vv.default]
            if self._serves(d):
                return d.key, d.tag
        c = next(iter(vv.versions.values()))
        return c.key, c.tag

    def answered(self, variant: str, tag: str, images: int) -> None:
        """Count what a version answered (the dispatcher calls it for variants with several)."""
        from . import metrics

        v = self.by_variant[variant].versions.get(tag)
        if v is not None:
            v.images += images
        metrics.VERSION_IMAGES.labels(variant, tag).inc(images)

    def tag_of(self, variant: str) -> str:
        """The configured checkpoint's exact tag."""
        return next(iter(self.by_variant[variant].versions))

    def _serves(self, v: Version) -> bool:
        return v.configured or (v.state == "ready" and self.usable(v.key))

    # admin ----------------------------------------------------------------------------------------------

    def get(self, variant: str) -> VariantVersions:
        if variant not in self.by_variant:
            raise ClientError(f"unknown variant {variant!r}; variants: {', '.join(self.by_variant)}", 404)
        return self.by_variant[variant]

    def find(self, variant: str, version: str) -> Version:
        """A version by its tag or by the part after the colon."""
        vv = self.get(variant)
        for v in vv.versions.values():
            if version in (v.tag, v.tag.split(":", 1)[-1]):
                return v
        raise ClientError(f"variant {variant!r} has no version {version!r}; versions: {', '.join(vv.versions)}", 404)

    def describe(self, variant: str) -> dict:
        vv = self.get(variant)
        return {"variant": variant, "default": vv.default, "previous": vv.previous,
                "versions": [v.row(vv.default, self._serves(v)) for v in vv.versions.values()]}

    def check(self, variant: str, tag: str) -> tuple[str, float | None]:
        """The exact tag of a checkpoint that may become a version of `variant`, and its test top-1: verified
        (sha256), with the variant's classes and input; raises ClientError (409) naming the difference."""
        from store import CheckpointError, read_manifest
        from store.checkpoint import verified_tag

        try:
            exact = verified_tag(tag)
            m, _ = read_manifest(exact)
        except CheckpointError as e:
            raise ClientError(f"checkpoint {tag!r} cannot be a version of {variant!r}: {e}", 409) from None
        base = self.manifests.get(variant)
        if base is None:
            raise ClientError(f"variant {variant!r} has no checkpoint loaded to compare with", 409)
        for f in INPUT_FIELDS:
            if getattr(m, f) != getattr(base, f):
                raise ClientError(f"checkpoint {exact!r} cannot be a version of {variant!r}: its {f} differs from "
                                  f"{self.by_variant[variant].default!r}'s", 409)
        return exact, _top1(m)

    async def load(self, variant: str, tag: str, share: float = 0.0) -> Version:
        """Start a version's workers; it is `loading` until a replica is ready (a background task), and takes
        `share` of the variant's requests from then on."""
        vv = self.get(variant)
        exact, top1 = await asyncio.to_thread(self.check, variant, tag)
        old = vv.versions.get(exact)
        if old is not None and old.state != "failed":
            raise ClientError(f"variant {variant!r} has version {exact!r} already ({old.state})", 409)
        self._check_shares(vv, exact, share)
        v = Version(exact, f"{variant}{SEP}{exact}", share=share, state="loading", since=time.time(), top1=top1)
        vv.versions[exact] = v
        self._start(variant, v)
        self.save()
        return v

    def set_share(self, variant: str, version: str, share: float) -> Version:
        vv, v = self.get(variant), self.find(variant, version)
        if v.tag == vv.default:
            raise ClientError(f"{v.tag!r} is the default: it takes what the other versions' shares leave; "
                              "promote another version instead", 409)
        if v.state != "ready" and share > 0:
            raise ClientError(f"version {v.tag!r} is {v.state}: it takes traffic only once ready"
                              + (f" ({v.error})" if v.error else ""), 409)
        self._check_shares(vv, v.tag, share)
        v.share = share
        self.save()
        return v

    def _check_shares(self, vv: VariantVersions, tag: str, share: float) -> None:
        if not 0 <= share <= 1:
            raise ClientError(f"a share is a percentage from 0 to 100, got {share * 100:g}", 400)
        others = sum(v.share for v in vv.versions.values() if v.tag not in (tag, vv.default))
        if others + share > 1 + 1e-9:
            raise ClientError(f"the versions' shares would add up to {(others + share) * 100:g}%: at most 100", 409)

    def promote(self, variant: str, version: str) -> Version:
        vv, v = self.get(variant), self.find(variant, version)
        if not self._serves(v):
            raise ClientError(f"version {v.tag!r} is {v.state if v.state != 'ready' else 'down'}: only a version "
                              "that serves can be promoted", 409)
        if v.tag != vv.default:
            vv.previous, vv.default = vv.default, v.tag
        for other in vv.versions.values():
            other.share = 0.0
        self.save()
        return v

    def rollback(self, variant: str) -> Version:
        """The previous default is the default again, and no version has a share."""
        vv = self.get(variant)
        if vv.previous is None or vv.previous not in vv.versions:
            raise ClientError(f"variant {variant!r} has nothing to roll back to: no version was promoted", 409)
        back = vv.versions[vv.previous]
        if not self._serves(back):
            raise ClientError(f"the previous default {back.tag!r} is {back.state}: it cannot serve", 409)
        vv.previous, vv.default = vv.default, back.tag
        for other in vv.versions.values():
            other.share = 0.0
        self.save()
        return back

    def unload(self, variant: str, version: str) -> Version:
        """Take a version out: no traffic from now on; its processes stop once its calls are done."""
        vv, v = self.get(variant), self.find(variant, version)
        if v.configured:
            raise ClientError(f"{v.tag!r} is the configured checkpoint of {variant!r}: its workers are the "
                              "configuration's (change the file to serve another)", 409)
        if v.tag == vv.default:
            raise ClientError(f"{v.tag!r} is the default: promote another version (or roll back) first", 409)
        v.share, v.state, v.since = 0.0, "draining", time.time()
        if vv.previous == v.tag:
            vv.previous = None
        self.save()
        self._background(self._drain(variant, v))
        return v

    # workers ----------------------------------------------------------------------------------------------

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _start(self, variant: str, v: Version) -> None:
        try:
            self._spawn(variant, v)
        except OSError as e:
            self._failed(v, f"its worker could not be started: {e}")
            return
        self.dispatcher.add_version(v.key, [f"http://127.0.0.1:{v.port}"])
        self._background(self._await_ready(variant, v))

    async def _await_ready(self, variant: str, v: Version) -> None:
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while v.state == "loading":
            await asyncio.sleep(0.25)
            reps = self.dispatcher.health.replicas.get(v.key, [])
            errors = [r.status["error"] for r in reps if r.status and r.status.get("error")]
            if v.proc is not None and v.proc.poll() is not None:
                await self._fail(v, f"its worker exited with status {v.proc.returncode} (log: {self._log(variant, v)})")
            elif errors:  # a worker answers only once it has loaded: an error is final
                await self._fail(v, errors[0])
            elif any(r.state == UP and r.status and r.status.get("ready") for r in reps):
                # a check's answer, not only "usable": a replica not checked yet counts as usable for calls
                v.state, v.since = "ready", time.time()
                logger.info("variant %s: version %s is ready (share %.0f%%)", variant, v.tag, v.share * 100)
                self.save()
            elif time.monotonic() > deadline:
                await self._fail(v, f"not ready after {LOAD_TIMEOUT_S:.0f} s (log: {self._log(variant, v)})")

    def _failed(self, v: Version, why: str) -> None:
        logger.error("version %s failed: %s", v.tag, why)
        v.state, v.error, v.since = "failed", why, time.time()

    async def _fail(self, v: Version, why: str) -> None:
        self._failed(v, why)
        await self._stop(v)
        self.save()

    async def _drain(self, variant: str, v: Version) -> None:
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while self.dispatcher.calls_pending(v.key) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await self._stop(v)
        vv = self.by_variant[variant]
        if vv.versions.get(v.tag) is v:
            del vv.versions[v.tag]
        from . import metrics

        metrics.VERSION_SHARE.labels(variant, v.tag).set(0)
        logger.info("variant %s: version %s unloaded", variant, v.tag)
        self.save()

    async def _stop(self, v: Version) -> None:
        await self.dispatcher.remove_version(v.key)
        proc, v.proc = v.proc, None
        if proc is not None and proc.poll() is None:
            import signal

            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # it drains what it has, then stops (service/drain.py)
            try:
                await asyncio.to_thread(proc.wait, 30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)

    def _log(self, variant: str, v: Version) -> Path:
        return state_dir() / "versions" / f"{variant}-{v.tag.replace(':', '-')}.log"

    def _spawn(self, variant: str, v: Version) -> None:
        import socket

        from .children import die_with_parent
        from .worker_app import TOKEN_ENV

        with socket.socket() as s:  # a free port on this host, for the version's own server
            s.bind(("127.0.0.1", 0))
            v.port = s.getsockname()[1]
        log = self._log(variant, v)
        log.parent.mkdir(parents=True, exist_ok=True)
        # Not BentoML's variables of this server: the version's worker is a server of its own.
        env = {k: val for k, val in os.environ.items() if not k.startswith(("BENTOML_", "PROMETHEUS_"))
               or k in ("BENTOML_HOME", "BENTOML_DO_NOT_TRACK")}
        env[TOKEN_ENV] = self.token
        cmd = [sys.executable, "-m", "cli.worker", variant, "--model", v.tag, "--host", "127.0.0.1",
               "--port", str(v.port), "--config", self.source]
        with open(log, "ab") as out:
            v.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True, preexec_fn=die_with_parent)
        logger.info("variant %s: loading version %s (port %d, log %s)", variant, v.tag, v.port, log)

    # saved across restarts --------------------------------------------------------------------------------

    def publish(self) -> None:
        """`effnet_version_share`: what each version of a variant with several takes now."""
        from . import metrics

        for name, vv in self.by_variant.items():
            if len(vv.versions) < 2 and vv.previous is None:
                continue
            left = 1 - sum(v.share for v in vv.versions.values() if v.tag != vv.default and self._serves(v))
            for v in vv.versions.values():
                share = (left if v.tag == vv.default else v.share) if self._serves(v) else 0.0
                metrics.VERSION_SHARE.labels(name, v.tag).set(share)

    def save(self) -> None:
        self.publish()
        data = {"config": self.source, "variants": {
            name: {"default": vv.default, "previous": vv.previous,
                   "versions": [{"tag": v.tag, "share": v.share} for v in vv.versions.values()
                                if not v.configured and v.state in ("loading", "ready")]}
            for name, vv in self.by_variant.items() if len(vv.versions) > 1 or vv.previous}}
        try:
            write_atomic(self.file, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())
        except OSError as e:  # served on; the next restart serves the configured versions only
            logger.error("the versions cannot be saved in %s: %s", self.file, e)

    def restore(self) -> None:
        """Load the versions saved by the last run again (in the background); their shares, default and
        previous come back with them, and each takes traffic once ready."""
        try:
            saved = json.loads(self.file.read_text())["variants"]
        except (OSError, ValueError, KeyError):
            return
        for name, s in saved.items():
            vv = self.by_variant.get(name)
            if vv is None:
                continue
            for item in s.get("versions", []):
                tag, share = item["tag"], float(item.get("share", 0))
                if tag in vv.versions:
                    continue
                v = Version(tag, f"{name}{SEP}{tag}", share=share, state="loading", since=time.time())
                vv.versions[tag] = v
                try:
                    v.top1 = self.check(name, tag)[1]
                except ClientError as e:
                    self._failed(v, str(e))
                    continue
                self._start(name, v)
            vv.default = s["default"] if s.get("default") in vv.versions else vv.default
            vv.previous = s["previous"] if s.get("previous") in vv.versions else None
            logger.info("variant %s: restored versions %s (default %s)", name, list(vv.versions), vv.default)

    async def close(self) -> None:
        for vv in self.by_variant.values():
            for v in vv.versions.values():
                if v.proc is not None:
                    await self._stop(v)
