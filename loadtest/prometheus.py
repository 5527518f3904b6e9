"""A real Prometheus server for one load-test run, and PromQL queries against its HTTP API.

`PrometheusServer` writes a scrape configuration for the given targets (127.0.0.1 only, a 1 s
interval by default), starts `/usr/bin/prometheus` on a free loopback port with its own temporary
data directory, waits until it is ready and has scraped every target once, and stops it (SIGTERM,
then SIGKILL) when the `with` block ends, also on an exception or Ctrl-C.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .processes import free_port, stop_process

PROMETHEUS_BIN = "/usr/bin/prometheus"


def loopback_target(url: str) -> str:
    """`http://127.0.0.1:3000` -> `127.0.0.1:3000`; anything off this machine is refused."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"load tests target 127.0.0.1 only, not {parts.hostname}")
    return f"127.0.0.1:{parts.port or 80}"


def scrape_config(targets: dict[str, str], interval_s: float, rule_files: list[str] = ()) -> str:
    """Prometheus YAML: one job per target (job name -> host:port), all at `interval_s`; rules evaluated
    as often."""
    iv = f"{int(interval_s * 1000)}ms"
    lines = ["global:", f"  scrape_interval: {iv}", f"  evaluation_interval: {iv}"]
    if rule_files:
        lines += ["rule_files:"] + [f"  - {json.dumps(str(f))}" for f in rule_files]
    lines += ["scrape_configs:"]
    for job, target in targets.items():
        lines += [f"  - job_name: {json.dumps(job)}", f"    scrape_interval: {iv}", f"    scrape_timeout: {iv}",
                  "    metrics_path: /metrics", "    static_configs:", f"      - targets: [{json.dumps(target)}]"]
    return "\n".join(lines) + "\n"


class PrometheusError(RuntimeError):
    pass


class PrometheusServer:
    """`with PrometheusServer({"effnet": "127.0.0.1:3000"}) as prom: prom.query("up")`."""

    def __init__(self, targets: dict[str, str], interval_s: float = 1.0, binary: str = PROMETHEUS_BIN,
                 port: int | None = None, keep_dir: Path | None = None, rule_files: list[Path] = ()) -> None:
        if not 0.1 <= interval_s <= 60:
            raise ValueError("scrape interval must be between 0.1 and 60 s")
        self.targets = {job: loopback_target(t) for job, t in targets.items()}
        self.interval_s = interval_s
        self.binary = binary
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.keep_dir = keep_dir  # where to copy the config for the report
        self.rule_files = [Path(f) for f in rule_files]  # recording and alerting rules to evaluate
        self.proc: subprocess.Popen | None = None
        self.tmp: Path | None = None

    def version(self) -> str:
        out = subprocess.run([self.binary, "--version"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"version (\S+)", out)
        return m.group(1) if m else (out.splitlines()[0] if out else "unknown")

    def start(self, timeout: float = 30.0) -> "PrometheusServer":
        if not Path(self.binary).exists():
            raise PrometheusError(f"{self.binary} not found: install the Debian package `prometheus` (make setup)")
        self.tmp = Path(tempfile.mkdtemp(prefix="effnet-prom-"))
        config = self.tmp / "prometheus.yml"
        rules = []
        for f in self.rule_files:  # copied beside the config: the report folder keeps what was evaluated
            rules.append(self.tmp / f.name)
            shutil.copy(f, rules[-1])
        config.write_text(scrape_config(self.targets, self.interval_s, [r.name for r in rules]))
        if self.keep_dir:
            self.keep_dir.mkdir(parents=True, exist_ok=True)
            for f in [config, *rules]:
                shutil.copy(f, self.keep_dir / f.name)
        self.log = open(self.tmp / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={config}", f"--storage.tsdb.path={self.tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1d",
             "--web.enable-lifecycle", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PrometheusError(f"prometheus exited ({self.proc.returncode}): {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.2)
        else:
            raise PrometheusError(f"prometheus not ready after {timeout:.0f} s: {self.log_tail()}")
        self.wait_scraped(deadline - time.monotonic())

    def wait_scraped(self, timeout: float = 15.0, after: float | None = None) -> None:
        """Until every target has been scraped successfully (after time `after`, if given)."""
        deadline = time.monotonic() + max(timeout, 1.0)
        while time.monotonic() < deadline:
            targets = self.api("targets", {"state": "active"}).get("activeTargets", [])
            ok = [t for t in targets if t.get("health") == "up"]
            if after is not None:
                ok = [t for t in ok if _rfc3339(t.get("lastScrape", "")) > after]
            if len(ok) >= len(self.targets):
                return
            time.sleep(self.interval_s / 4)
        raise PrometheusError(f"targets not scraped within {timeout:.0f} s: {self.api('targets')}")

    def log_tail(self, n: int = 2000) -> str:
        try:
            return (self.tmp / "prometheus.log").read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=10)
            self.proc = None
        if getattr(self, "log", None):
            self.log.close()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def __enter__(self) -> "PrometheusServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # HTTP API
    def api(self, path: str, params: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                answer = json.loads(r.read())
        except urllib.error.HTTPError as e:
            answer = json.loads(e.read() or b"{}")
        if answer.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {answer.get('errorType')}: {answer.get('error')}")
        return answer["data"]

    def query(self, promql: str, at: float | None = None) -> list[dict]:
        """Instant query: a list of {metric: {labels}, value: float}."""
        params = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", params)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": float(data["result"][1])}]
        return [{"metric": r["metric"], "value": float(r["value"][1])} for r in data["result"]]

    def scalar(self, promql: str, at: float | None = None, default: float | None = None) -> float | None:
        """The single value of a query (summed if several series), `default` if none."""
        rows = [r["value"] for r in self.query(promql, at)]
        rows = [v for v in rows if v == v]  # NaN: e.g. a quantile of an empty histogram
        return sum(rows) if rows else default

    def alerts_during(self, start: float, end: float) -> list[dict]:
        """Every alert that was pending or firing at some point in [start, end]: its labels, the worst
        state it reached and when it first appeared (from the ALERTS series the rules write)."""
        data = self.api("query_range", {"query": "ALERTS", "start": f"{start:.3f}", "end": f"{end:.3f}",
                                        "step": f"{max(self.interval_s, (end - start) / 10000):.3f}"})
        seen: dict[tuple, dict] = {}
        # plus an instant query at `end`: the range's last step may fall just before it
        at_end = [{"metric": r["metric"], "values": [(end, r["value"])]} for r in self.query("ALERTS", at=end)]
        for r in data.get("result", []) + at_end:
            labels = {k: v for k, v in r["metric"].items() if k not in ("__name__", "alertstate", "job", "instance")}
            key = tuple(sorted(labels.items()))
            first = min(float(t) for t, _ in r["values"]) if r["values"] else start
            row = seen.setdefault(key, {**labels, "state": "pending", "first_seen_s": round(first - start, 1)})
            row["first_seen_s"] = min(row["first_seen_s"], round(first - start, 1))
            if r["metric"].get("alertstate") == "firing":
                row["state"] = "firing"
        return sorted(seen.values(), key=lambda a: (a["state"] != "firing", a.get("alertname", ""), a["first_seen_s"]))

    def series_names(self, prefix: str = "") -> list[str]:
        names = self.api("label/__name__/values")
        return [n for n in names if n.startswith(prefix)]


def _rfc3339(ts: str) -> float:
    """Prometheus' lastScrape (`2026-11-26T22:31:05.123456789Z`) -> epoch seconds (0 if unparsable)."""
    from datetime import datetime

    if not ts:
        return 0.0
    ts = ts.rstrip("Z")
    if "." in ts:
        head, frac = ts.split(".", 1)
        frac = "".join(c for c in frac if c.isdigit())[:6]
        ts = f"{head}.{frac}"
    try:
        from datetime import timezone

        fmt = "%Y-%m-%dT%H:%M:%S.%f" if "." in ts else "%Y-%m-%dT%H:%M:%S"
        return datetime.strptime(ts[:26], fmt).replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        return 0.0
