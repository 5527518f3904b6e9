"""What a soak measures and how it judges it: per-process samples, a least-squares growth per hour, goals.

- `sample_tree(root)`: RSS (VmRSS of /proc/PID/status), open files (entries of /proc/PID/fd) and
  threads (Threads of /proc/PID/status) of a process and every process below it, each labelled by what
  it is (the BentoML service name of a worker, else its command).
- `fit_growth(times, values)`: the slope of the least-squares line, per hour; samples inside the
  warm-up are left out by the caller (`after_warmup`).
- `judge(series, ...)`: per process and figure, growth per hour and pass or fail. RSS passes under
  `rss_goal_mb_per_h` (50 MB/h: what a service restarted daily can carry without a memory alarm).
  Open files and threads must not grow: they pass when the fitted line rises by less than one over
  the judged window, or when the highest count of the last quarter of the window is no higher than the
  highest of its first quarter (a pool that opens and closes connections is bounded, not leaking; a leak
  raises both the line and the maximum).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

PROC = Path("/proc")
RSS_GOAL_MB_PER_H = 50.0
MB = 1e6


def _status_fields(pid: int) -> dict[str, str]:
    out = {}
    for line in (PROC / str(pid) / "status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def read_process(pid: int) -> dict | None:
    """{rss_bytes, fds, threads} of one process, or None when it is gone (or not ours to read)."""
    try:
        status = _status_fields(pid)
        fds = len(os.listdir(PROC / str(pid) / "fd"))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    kb = lambda key: int(status.get(key, "0 kB").split()[0]) * 1024  # a zombie has none
    # RssAnon is the process's own heap and stacks, where a leak shows; VmRSS adds file-backed pages
    # (libraries, mapped weights) that the kernel drops and reloads under memory pressure.
    return {"rss_bytes": kb("VmRSS"), "rss_anon_bytes": kb("RssAnon"), "fds": fds,
            "threads": int(status.get("Threads", "0"))}


def children(pid: int) -> list[int]:
    """Direct children, from /proc/PID/task/*/children (every thread's, since a child's parent is a thread)."""
    out: list[int] = []
    try:
        for task in (PROC / str(pid) / "task").iterdir():
            try:
                out += [int(x) for x in (task / "children").read_text().split()]
            except (FileNotFoundError, ProcessLookupError):
                continue
    except (FileNotFoundError, ProcessLookupError):
        return []
    return sorted(set(out))


def process_tree(root: int) -> list[int]:
    """`root` and every process below it, parents first."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        if pid in out:
            continue
        out.append(pid)
        todo += children(pid)
    return out


def label(pid: int) -> str:
    """What the process is: `effnet-worker-b0` (a BentoML service by its --service-name), else its command."""
    try:
        argv = (PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return f"pid {pid}"
    args = [a.decode(errors="replace") for a in argv if a]
    if "--service-name" in args and args.index("--service-name") + 1 < len(args):
        name = args[args.index("--service-name") + 1]
        worker = args[args.index("--worker-id") + 1] if "--worker-id" in args[:-1] else None
        return f"{name}" + (f" #{worker}" if worker and worker != "1" else "")
    text = " ".join(args)
    for pattern, name in ((r"-m bentoml serve", "bentoml serve (supervisor)"), (r"cli\.main serve|effnet serve", "effnet serve")):
        if re.search(pattern, text):
            return name
    return os.path.basename(args[0]) if args else f"pid {pid}"


def sample_tree(root: int) -> dict[int, dict]:
    """{pid: {label, rss_bytes, fds, threads}} of `root` and every process below it that could be read."""
    out = {}
    for pid in process_tree(root):
        figures = read_process(pid)
        if figures is not None:
            out[pid] = {"label": label(pid), **figures}
    return out


@dataclass
class Series:
    """One process's samples: seconds since the start, and each figure at those times."""
    pid: int
    label: str
    t: list[float]
    rss_bytes: list[float]
    fds: list[float]
    threads: list[float]
    rss_anon_bytes: list[float] = field(default_factory=list)  # empty where the samples lack it


def series_from_samples(samples: list[dict]) -> list[Series]:
    """[{t, processes: {pid: {label, rss_bytes, fds, threads}}}] -> a Series per process, in order of appearance."""
    by_pid: dict[int, Series] = {}
    for s in samples:
        for pid, p in s["processes"].items():
            pid = int(pid)
            ser = by_pid.setdefault(pid, Series(pid, p["label"], [], [], [], []))
            ser.t.append(s["t"])
            ser.rss_bytes.append(p["rss_bytes"])
            ser.fds.append(p["fds"])
            ser.threads.append(p["threads"])
            if p.get("rss_anon_bytes") is not None:
                ser.rss_anon_bytes.append(p["rss_anon_bytes"])
    return list(by_pid.values())


def fit_growth(times: list[float], values: list[float]) -> float | None:
    """Least-squares slope of values against times (seconds), per hour; None with fewer than 3 points or no
    spread in time."""
    n = len(times)
    if n < 3 or n != len(values):
        return None
    mt, mv = sum(times) / n, sum(values) / n
    stt = sum((t - mt) ** 2 for t in times)
    if stt <= 0:
        return None
    return sum((t - mt) * (v - mv) for t, v in zip(times, values)) / stt * 3600.0


def warmup_seconds(duration_s: float, share: float = 0.1, floor_s: float = 120.0) -> float:
    """The larger of `share` of the run and `floor_s`, at most half the run: allocators, caches and pools
    settle in the first minutes, and that growth is not a leak."""
    return min(max(duration_s * share, floor_s), duration_s / 2)


def after_warmup(ser: Series, warmup_s: float) -> Series:
    keep = [i for i, t in enumerate(ser.t) if t >= warmup_s]
    pick = lambda xs: [xs[i] for i in keep] if len(xs) == len(ser.t) else []
    return Series(ser.pid, ser.label, pick(ser.t), pick(ser.rss_bytes), pick(ser.fds), pick(ser.threads),
                  pick(ser.rss_anon_bytes))


def _bounded(values: list[float]) -> bool:
    """The highest value of the last quarter is no higher than the highest of the first quarter."""
    q = max(1, len(values) // 4)
    return max(values[-q:]) <= max(values[:q])


def judge_counts(t: list[float], values: list[float]) -> dict:
    """Open files or threads: growth per hour, the rise over the window, and whether it passes (see the module)."""
    per_h = fit_growth(t, values)
    if per_h is None:
        return {"per_hour": None, "rise": None, "bounded": None, "pass": None}
    rise = per_h * (t[-1] - t[0]) / 3600.0
    bounded = _bounded(values)
    return {"per_hour": round(per_h, 2), "rise": round(rise, 2), "bounded": bounded,
            "first": values[0], "last": values[-1], "max": max(values), "pass": rise < 1.0 or bounded}


def judge_rss(t: list[float], values: list[float], goal_mb_per_h: float = RSS_GOAL_MB_PER_H) -> dict:
    per_h = fit_growth(t, values)
    if per_h is None:
        return {"mb_per_hour": None, "pass": None}
    return {"mb_per_hour": round(per_h / MB, 2), "first_mb": round(values[0] / MB, 1),
            "last_mb": round(values[-1] / MB, 1), "max_mb": round(max(values) / MB, 1),
            "pass": per_h / MB < goal_mb_per_h}


def judge(series: list[Series], warmup_s: float, rss_goal_mb_per_h: float = RSS_GOAL_MB_PER_H) -> list[dict]:
    """A row per process: its label, samples judged, RSS / fds / threads verdicts, and `pass` for all three
    (None when too few samples after the warm-up to fit: a process that came and went is listed, not judged)."""
    rows = []
    for ser in series:
        kept = after_warmup(ser, warmup_s)
        rss = judge_rss(kept.t, kept.rss_bytes, rss_goal_mb_per_h)
        fds = judge_counts(kept.t, kept.fds)
        threads = judge_counts(kept.t, kept.threads)
        verdicts = [v["pass"] for v in (rss, fds, threads)]
        # Anonymous RSS is shown beside RSS, not judged: the goal is on RSS, and a leak raises both.
        anon = judge_rss(kept.t, kept.rss_anon_bytes, rss_goal_mb_per_h) if kept.rss_anon_bytes else None
        rows.append({"pid": ser.pid, "label": ser.label, "samples": len(ser.t), "judged_samples": len(kept.t),
                     "first_t": ser.t[0] if ser.t else None, "last_t": ser.t[-1] if ser.t else None,
                     "rss": rss, "rss_anon": anon, "fds": fds, "threads": threads,
                     "pass": None if None in verdicts else all(verdicts)})
    return rows
