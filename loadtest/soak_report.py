"""The soak's report: report.md (verdicts per process, the load carried) and rss.png (RSS, open files and
threads over time per process), both from results.json."""
from __future__ import annotations

import json
from pathlib import Path

from .soak_measure import MB, series_from_samples


def _mark(ok) -> str:
    return "pass" if ok is True else "FAIL" if ok is False else "-"


def _num(x, fmt="{:+.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def markdown(r: dict, plot: str | None = "rss.png") -> str:
    cfg, m, v = r["config"], r["machine"], r["verdict"]
    warm = r["warmup_s"]
    warm_rule = ("given with --warmup" if cfg.get("warmup_s") is not None
                 else "the larger of 10% of the duration and 2 minutes, at most half the run")
    lines = [
        f"# Soak run {r['run']}: {'PASS' if v['pass'] else 'FAIL'}", "",
        (f"- date: {r['date']} to {r.get('ended', '?')} (UTC); soak {r.get('soak_s', 0) / 60:.1f} min of "
        f"{cfg['duration_s'] / 60:.1f} min asked, a sample every {cfg['interval_s']:g} s"),
        f"- machine: {m.get('host')}, {m.get('cpu')}, {m.get('cores')} cores, {m.get('memory_gib')} GiB",
        (f"- service: `effnet serve` ({cfg.get('config') or 'service/config.yaml'}) on {r.get('url', '?')}, "
        f"store {r.get('store')}, ready in {r.get('service_start_s', '?')} s"),
        f"- warm-up left out of the fits: the first {warm:.0f} s ({warm_rule})",
        (f"- goals per process: RSS growth under {cfg['rss_goal_mb_per_h']:g} MB/h; open files and threads do not "
        "grow (the fitted line rises by less than 1 over the judged window, or the highest count of its last "
        "quarter is no higher than that of its first quarter)"),
        f"- load: at most {cfg['max_error_rate']:.0%} of requests may fail", "",
    ]
    if v["reasons"]:
        lines += ["Why it fails:", ""] + [f"- {x}" for x in v["reasons"]] + [""]
    lines += ["## Processes", "",
              "Growth per hour is the slope of a least-squares line through the samples after the warm-up.", "",
              ("| process | pid | samples | RSS first -> last MB | RSS MB/h | anonymous RSS MB/h | fds first -> last (max) | fds /h "
              "| threads first -> last (max) | threads /h | RSS | fds | threads |"),
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in r.get("processes", []):
        rss, fds, th = p["rss"], p["fds"], p["threads"]
        lines.append(
            f"| {p['label']} | {p['pid']} | {p['judged_samples']}/{p['samples']} | "
            f"{_num(rss.get('first_mb'), '{:.0f}')} -> {_num(rss.get('last_mb'), '{:.0f}')} | "
            f"{_num(rss.get('mb_per_hour'))} | {_num((p.get('rss_anon') or {}).get('mb_per_hour'))} | {fds.get('first', '-')} -> {fds.get('last', '-')} ({fds.get('max', '-')}) | "
            f"{_num(fds.get('per_hour'))} | {th.get('first', '-')} -> {th.get('last', '-')} ({th.get('max', '-')}) | "
            f"{_num(th.get('per_hour'))} | {_mark(rss['pass'])} | {_mark(fds['pass'])} | {_mark(th['pass'])} |")
    lines += ["", "## Load", ""]
    for route, t in (r.get("targets") or {}).items():
        lines.append(f"- {route}: capacity {t['capacity_rps']} req/s in the ramp, soak target {t['target_rps']} req/s "
                     f"over {t['connections']} connections")
    lines += ["", ("| route | requests | 2xx | errors | statuses | socket errors | req/s | p99 ms (median of "
              "intervals) | p99 ms (worst interval) |"), "|---|---|---|---|---|---|---|---|---|"]
    for route, s in (r.get("load") or {}).items():
        statuses = ", ".join(f"{k}: {n}" for k, n in s["statuses"].items()) or "-"
        sock = ", ".join(f"{k}: {n}" for k, n in s["socket_errors"].items()) or "0"
        lines.append(f"| {route} | {s['requests']} | {s['ok']} | {s['errors']} | {statuses} | {sock} | {s['rps']} | "
                     f"{s['p99_ms_median']} | {s['p99_ms_max']} |")
    if r.get("ramp"):
        lines += ["", "Ramp (closed loop, every route at once):", "",
                  "| connections per route | 2xx req/s | errors | " + " | ".join(
                      f"{rt} req/s, p99 ms" for rt in r["ramp"]["levels"][0]["routes"]) + " |",
                  "|---|---|---|" + "---|" * len(r["ramp"]["levels"][0]["routes"])]
        for lv in r["ramp"]["levels"]:
            lines.append(f"| {lv['connections']} | {lv['ok_rps']} | {lv['errors']} | " + " | ".join(
                f"{f['ok_rps']}, {f['p99_ms']}" for f in lv["routes"].values()) + " |")
    if r.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in r["notes"]]
    if plot:
        lines += ["", f"![RSS, open files and threads per process over time]({plot})"]
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = series_from_samples(r.get("samples", []))
    fig, axes = plt.subplots(3, 1, figsize=(10, 10), sharex=True)
    for ser in series:
        t = [x / 60 for x in ser.t]
        name = f"{ser.label} ({ser.pid})"
        axes[0].plot(t, [x / MB for x in ser.rss_bytes], label=name)
        axes[1].plot(t, ser.fds, label=name)
        axes[2].plot(t, ser.threads, label=name)
    for ax, what in zip(axes, ("RSS (MB)", "open files", "threads")):
        ax.axvline(r["warmup_s"] / 60, color="grey", linestyle=":", label="end of warm-up")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    axes[0].set_title(f"Soak {r['run']}: every process of the server")
    axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    axes[2].set_xlabel("minutes since the soak started")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(folder: Path, results: dict | None = None) -> Path:
    folder = Path(folder)
    r = results if results is not None else json.loads((folder / "results.json").read_text())
    plotted = None
    if r.get("samples"):
        plot(r, folder / "rss.png")
        plotted = "rss.png"
    (folder / "report.md").write_text(markdown(r, plotted))
    return folder / "report.md"


def publish(folder: Path, dest: Path) -> list[Path]:
    """Copy a run's report, data and plot into `dest` (e.g. benchmarks/results/DATE-HOST) as soak-RUN.md,
    .json and .png, the report's plot link following the new name."""
    folder, dest = Path(folder), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    stem = folder.name if folder.name.startswith("soak-") else f"soak-{folder.name}"
    out = [dest / f"{stem}.md", dest / f"{stem}.json"]
    out[0].write_text((folder / "report.md").read_text().replace("](rss.png)", f"]({stem}.png)"))
    out[1].write_text((folder / "results.json").read_text())
    if (folder / "rss.png").is_file():
        out.append(dest / f"{stem}.png")
        out[-1].write_bytes((folder / "rss.png").read_bytes())
    return out
