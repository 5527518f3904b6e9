"""The soak's measurement: the growth fit on synthetic samples, and a negative control that runs the real
sampler on small processes that leak on purpose (and one that does not)."""
import argparse
import subprocess
import sys
import time

import pytest

from cli.soak import duration
from loadtest.soak import SoakConfig, summarise_load, verdict
from loadtest.soak_load import delay_for, next_delay_ms, parse_wrk
from loadtest.soak_measure import (
    MB,
    Series,
    fit_growth,
    judge,
    judge_counts,
    judge_rss,
    process_tree,
    read_process,
    sample_tree,
    series_from_samples,
    warmup_seconds,
)
from loadtest.soak_report import markdown

# --- the fit on synthetic samples ------------------------------------------------------------------------


def test_the_fit_recovers_a_linear_growth_per_hour():
    t = [i * 10.0 for i in range(100)]
    assert fit_growth(t, [5.0 + 0.01 * x for x in t]) == pytest.approx(36.0)
    assert fit_growth(t, [7.0] * 100) == pytest.approx(0.0)


def test_the_fit_needs_three_samples_spread_in_time():
    assert fit_growth([0.0, 1.0], [1.0, 2.0]) is None
    assert fit_growth([5.0, 5.0, 5.0], [1.0, 2.0, 3.0]) is None


def test_noise_around_a_flat_line_fits_near_zero_and_passes_the_rss_goal():
    t = [i * 10.0 for i in range(360)]  # an hour
    rss = [800 * MB + (3 * MB if i % 2 else -3 * MB) for i in range(360)]  # +-3 MB around 800 MB
    verdict_ = judge_rss(t, rss)
    assert abs(verdict_["mb_per_hour"]) < 1 and verdict_["pass"] is True


def test_rss_growth_over_the_goal_fails_and_under_it_passes():
    t = [i * 10.0 for i in range(360)]
    assert judge_rss(t, [500 * MB + 80 * MB * x / 3600 for x in t])["pass"] is False  # 80 MB/h
    assert judge_rss(t, [500 * MB + 20 * MB * x / 3600 for x in t])["pass"] is True  # 20 MB/h
    assert judge_rss(t, [500 * MB + 80 * MB * x / 3600 for x in t], goal_mb_per_h=100)["pass"] is True


def test_a_steadily_growing_fd_count_fails_and_a_bounded_one_passes():
    t = [i * 10.0 for i in range(60)]
    assert judge_counts(t, [40 + i // 6 for i in range(60)])["pass"] is False  # one more fd a minute
    churn = judge_counts(t, [40 + (i * 7) % 5 for i in range(60)])  # connections open and close
    assert churn["pass"] is True and churn["bounded"] is True
    assert judge_counts(t, [12] * 60) == {**judge_counts(t, [12] * 60), "rise": 0.0, "pass": True}


def test_the_warm_up_is_ten_percent_or_two_minutes_at_most_half_the_run():
    assert warmup_seconds(3600) == 360
    assert warmup_seconds(600) == 120
    assert warmup_seconds(100) == 50


def test_samples_inside_the_warm_up_are_left_out_of_the_fit():
    # Fast growth during the first 120 s (a pool filling), flat afterwards: that is not a leak.
    t = [i * 10.0 for i in range(90)]
    rss = [min(x, 120.0) * 2 * MB + 400 * MB for x in t]
    ser = Series(1, "gateway", t, rss, [30] * 90, [4] * 90)
    assert judge([ser], warmup_s=0)[0]["rss"]["pass"] is False
    row = judge([ser], warmup_s=120)[0]
    assert row["pass"] is True and row["judged_samples"] == 78 and row["rss"]["mb_per_hour"] == 0


def test_samples_become_one_series_per_process_with_json_keys():
    samples = [{"t": float(i), "processes": {"7": {"label": "b0", "rss_bytes": i, "fds": 3, "threads": 2},
                                             "9": {"label": "gw", "rss_bytes": 1, "fds": 4, "threads": 1}}}
               for i in range(4)]
    series = {s.label: s for s in series_from_samples(samples)}
    assert series["b0"].pid == 7 and series["b0"].rss_bytes == [0, 1, 2, 3] and series["gw"].t == [0, 1, 2, 3]


def test_a_process_that_ends_early_and_load_errors_fail_the_run():
    procs = judge([Series(1, "b0", [0, 10, 20, 30], [1e8] * 4, [5] * 4, [2] * 4),
                   Series(2, "gw", [0, 10, 20, 30, 40], [1e8] * 5, [5] * 5, [2] * 5)], warmup_s=0)
    ok_load = {"fashion": {"requests": 1000, "errors": 0}}
    v = verdict(procs, ok_load, SoakConfig(), None, end_t=40)
    assert v["pass"] is False and any("b0 (pid 1) ended at 30 s" in r for r in v["reasons"])
    v = verdict(procs[1:], {"fashion": {"requests": 1000, "errors": 20}}, SoakConfig(), None, end_t=40)
    assert v["pass"] is False and any("20 of 1000" in r for r in v["reasons"])
    assert verdict(procs[1:], ok_load, SoakConfig(), None, end_t=40) == {"pass": True, "reasons": [],
                                                                        "error_rate": 0.0}


# --- load pacing and the wrk figures ---------------------------------------------------------------------


def test_pacing_sets_the_pause_that_carries_the_target():
    assert delay_for(4, 20.0, 0.05) == 150  # 4 connections, 0.2 s a cycle, 50 ms of it latency
    # An interval with a 150 ms pause that carried 16 req/s had 100 ms latency: 100 ms of pause carries 20.
    assert next_delay_ms(4, 20.0, 150, 16.0) == 100
    assert next_delay_ms(4, 20.0, 100, 0.0) == 50  # nothing answered: halve, do not jump


def test_wrk_figures_count_non_2xx_and_socket_errors_as_errors():
    line = ('EFFNET_WRK {"duration_us": 10000000, "requests": 103, "statuses": {"200": 100, "503": 3}, '
            '"p50_us": 5000, "p99_us": 42000, "max_us": 60000, "connect_errors": 0, "read_errors": 2, '
            '"write_errors": 0, "timeouts": 1}')
    f = parse_wrk("Running 10s test\n" + line + "\n")
    assert (f["requests"], f["ok"], f["errors"], f["rps"], f["p99_ms"]) == (103, 100, 6, 10.3, 42.0)
    assert f["socket_errors"] == {"read_errors": 2, "timeouts": 1}
    load = summarise_load([{"routes": {"fashion": f}}, {"routes": {"fashion": f}}])["fashion"]
    assert load["requests"] == 206 and load["statuses"] == {"200": 200, "503": 6} and load["errors"] == 12
    with pytest.raises(RuntimeError):
        parse_wrk("no figures", "unable to connect", 1)


def test_durations_read_as_seconds_minutes_or_hours_within_bounds():
    assert duration("30m") == 1800 and duration("1h") == 3600 and duration("90") == 90 and duration("1.5h") == 5400
    for bad in ("5s", "25h", "soon", "-1m"):
        with pytest.raises(argparse.ArgumentTypeError):
            duration(bad)


def test_the_report_names_the_failing_process_and_the_warm_up_rule():
    t = [i * 10.0 for i in range(40)]
    procs = judge([Series(3, "effnet-worker-b0", t, [1e8 + 1e5 * x for x in t], [9] * 40, [3] * 40)], warmup_s=100)
    results = {"run": "x", "date": "d", "ended": "e", "soak_s": 390, "warmup_s": 100, "url": "http://127.0.0.1:1",
               "store": "/s", "machine": {"host": "h", "cpu": "c", "cores": 2, "memory_gib": 8},
               "config": {**SoakConfig(duration_s=400).__dict__}, "processes": procs, "load": {}, "notes": [],
               "verdict": {"pass": False, "reasons": ["effnet-worker-b0 (pid 3): rss growth over the goal"]}}
    text = markdown(results, plot=None)
    assert "FAIL" in text.splitlines()[0] and "| effnet-worker-b0 | 3 |" in text and "+360.0 |" in text
    assert "the first 100 s (the larger of 10% of the duration and 2 minutes" in text


# --- the negative control: the real sampler on processes that leak ---------------------------------------

CHILD = r"""
import os, sys, threading, time
mode, kept, stop = sys.argv[1], [], time.monotonic() + 30  # bounded even if nobody stops it
while time.monotonic() < stop:
    if mode == "rss":
        kept.append(bytearray(b"\1") * (1 << 20))  # 1 MB, every page written
    elif mode == "fds":
        kept.append(open(os.devnull, "rb"))
    elif mode == "threads":
        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    else:  # steady: the same work, given back every tick
        scratch = bytearray(b"\1") * (1 << 20)
        open(os.devnull, "rb").close()
        del scratch
    time.sleep(0.1)
"""


@pytest.fixture
def children():
    started = []

    def start(mode):
        p = subprocess.Popen([sys.executable, "-c", CHILD, mode])
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()
        p.wait()


def _sample_until(procs, min_t=2.5, min_samples=20, deadline_s=30.0):
    t0 = time.monotonic()
    samples = []
    while time.monotonic() - t0 < deadline_s:
        t = time.monotonic() - t0
        taken = {}
        for p in procs:
            taken.update(sample_tree(p.pid))
        samples.append({"t": t, "processes": taken})
        if t >= min_t and len(samples) >= min_samples:
            break
        time.sleep(0.1)
    return samples


@pytest.mark.server
def test_the_sampler_and_the_fit_catch_deliberate_leaks_and_pass_a_steady_process(children):
    procs = {mode: children(mode) for mode in ("rss", "fds", "threads", "steady")}
    rows = {r["pid"]: r for r in judge(series_from_samples(_sample_until(procs.values())), warmup_s=0.5)}
    rss, fds, threads, steady = (rows[procs[m].pid] for m in ("rss", "fds", "threads", "steady"))
    # About 10 MB/s is 36 GB/h: far over the 50 MB/h goal, whatever the timing on a busy machine.
    assert rss["rss"]["mb_per_hour"] > 100 * 50 and rss["rss"]["pass"] is False and rss["pass"] is False
    assert rss["rss_anon"]["mb_per_hour"] > 100 * 50  # the leak is the process's own memory
    assert fds["fds"]["per_hour"] > 1000 and fds["fds"]["pass"] is False
    assert threads["threads"]["per_hour"] > 1000 and threads["threads"]["pass"] is False
    assert steady["pass"] is True, steady


@pytest.mark.server
def test_the_sampled_tree_holds_the_children_of_the_process_it_starts_from():
    code = "import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); " \
           "print(c.pid, flush=True); time.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert process_tree(parent.pid) == [parent.pid, child]
        figures = read_process(child)
        assert figures["rss_bytes"] >= figures["rss_anon_bytes"] > 0 and figures["threads"] >= 1 and figures["fds"] >= 3
        assert set(sample_tree(parent.pid)) == {parent.pid, child}
    finally:
        parent.kill()
        parent.wait()
        subprocess.run(["kill", str(child)], check=False)
    assert read_process(2**22 + 12345) is None  # no such process


def test_soak_options_out_of_bounds_are_refused_before_anything_starts(capsys):
    from cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["soak", "--duration", "25h"])
    assert e.value.code == 2 and "10 s .. 24 h" in capsys.readouterr().err
    assert main(["soak", "--duration", "60s", "--interval", "30"]) == 2
    assert "fewer than 3 samples" in capsys.readouterr().err


def test_an_interrupted_run_still_renders_a_report_that_says_so():
    results = {"run": "x", "date": "d", "warmup_s": 120, "machine": {}, "config": SoakConfig().__dict__,
               "notes": ["interrupted (Ctrl-C): the figures cover the run until then"],
               "verdict": {"pass": False, "reasons": ["interrupted after 0 s of 3600 s"]}}
    text = markdown(results, plot=None)
    assert text.startswith("# Soak run x: FAIL") and "interrupted after 0 s" in text and "## Notes" in text


def test_a_published_report_links_its_renamed_plot(tmp_path):
    from loadtest.soak_report import publish

    run = tmp_path / "reports" / "soak-20261207-1600"
    run.mkdir(parents=True)
    (run / "report.md").write_text("# Soak\n\n![RSS](rss.png)\n")
    (run / "results.json").write_text("{}")
    (run / "rss.png").write_bytes(b"png")
    files = publish(run, tmp_path / "results")
    assert [f.name for f in files] == ["soak-20261207-1600.md", "soak-20261207-1600.json", "soak-20261207-1600.png"]
    assert "![RSS](soak-20261207-1600.png)" in files[0].read_text()
