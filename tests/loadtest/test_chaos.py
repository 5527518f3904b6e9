"""The chaos run: its verdicts from made-up records (no server), and a short run against a real server.

The short run is `make test`'s version of `make chaos`: one kill -9 of a worker, one SIGSTOP/SIGCONT,
one SIGTERM under load, on tiny fake checkpoints (b0 and compact on the fashion route, each also
loaded explicitly). It checks statuses, resets and readiness only; timings belong to the chaos report, so
it gives a failed variant 3 s to be marked down (`detect_s`) where the report allows the goal's 2 s.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from loadtest.chaos_report import analyse, p99, readyz_verdict, recovery_s, sigterm_verdict
from service.config import ServerConfig


def rec(stream, t, dt=0.01, st=200, e=""):
    return {"s": stream, "t": t, "dt": dt, "st": st, "e": e}


def scenario(records, readyz=None, **kw):
    marks = {"start": 0.0, "fault": 10.0, "during_end": 20.0, "end": 25.0}
    return {"marks": marks, "streams": ["b0", "compact"], "touched": ["b0"], "shared": [], "records": records,
            "readyz": readyz, "counted_down": True, **kw}


def steady(stream, start=0.0, end=25.0, dt=0.01):
    return [rec(stream, start + i * 0.1, dt) for i in range(int((end - start) * 10))]


def test_p99_is_the_value_below_which_99_percent_of_latencies_fall():
    assert p99(list(range(1, 101))) == 99
    assert p99([5.0]) == 5.0 and p99([]) is None


def test_recovery_counts_only_requests_sent_after_the_fault():
    recs = [rec("b0", 9.0, dt=3.0), rec("b0", 11.0, dt=0.5, st=503), rec("b0", 14.0, dt=0.5)]
    assert recovery_s(recs, 10.0) == 4.5
    assert recovery_s(recs[:2], 10.0) is None


def test_a_killed_variant_that_refuses_fast_and_recovers_passes():
    b0 = [r for r in steady("b0") if not 10 <= r["t"] < 13] + [rec("b0", 10 + i * 0.1, 0.005, 503) for i in range(30)]
    a = analyse(scenario(steady("compact") + b0, readyz=[{"t": 5.0, "dt": 0.01, "st": 200},
                                                          {"t": 12.5, "dt": 0.01, "st": 503}]))
    assert a["pass"], a["criteria"]
    assert a["recovery_s"]["b0"] == pytest.approx(3.01)


def test_a_variant_whose_requests_hang_instead_of_refusing_fails():
    b0 = [r for r in steady("b0") if not 10 <= r["t"] < 18] + [rec("b0", 10.5, dt=7.0, st=0, e="timeout")]
    a = analyse(scenario(steady("compact") + b0))
    assert a["criteria"]["touched: 200 or refusal within 100 ms"]["pass"] is False
    assert not a["pass"]


def test_an_error_or_a_slowdown_on_an_untouched_stream_fails():
    slow = [dict(r, dt=0.2) if r["t"] > 15 else r for r in steady("compact")]
    a = analyse(scenario(slow + steady("b0")))
    assert a["criteria"]["untouched: p99 within 25% or 20 ms"]["pass"] is False
    err = steady("compact") + [rec("compact", 12.0, st=429)] + steady("b0")
    assert analyse(scenario(err))["criteria"]["untouched: 0 errors"]["value"] == {"compact": 1}


def test_readyz_lies_when_it_times_out_or_says_ready_while_a_variant_is_down():
    polls = [{"t": 1.0, "dt": 0.01, "st": 200}, {"t": 13.0, "dt": 0.01, "st": 200}, {"t": 14.0, "dt": 1.0, "st": "timeout"}]
    v = readyz_verdict(polls, fault=10.0, down=(12.0, 16.0))
    assert not v["pass"] and v["value"]["timeouts"] == 1 and v["value"]["ready while down"] == 1
    assert readyz_verdict(polls[:1] + [{"t": 13.0, "dt": 0.01, "st": "refused"}], 10.0, (12.0, 16.0))["pass"]
    # asked inside the window but answered after its end (the worker may be back by then): not a lie
    assert readyz_verdict(polls[:1] + [{"t": 15.9, "dt": 0.3, "st": 200}], 10.0, (12.0, 16.0))["pass"]


def test_readyz_may_say_ready_once_the_killed_variant_refuses_no_more_but_not_before():
    # b0 refuses from 10 to 13 s; its clients wait Retry-After, so its next 200 starts at 14 s.
    b0 = [r for r in steady("b0") if not 10 <= r["t"] < 14] + [rec("b0", 10 + i * 0.1, 0.005, 503) for i in range(30)]
    ready_in_the_gap = [{"t": 5.0, "dt": 0.01, "st": 200}, {"t": 13.5, "dt": 0.01, "st": 200}]
    a = analyse(scenario(steady("compact") + b0, readyz=ready_in_the_gap))
    assert a["criteria"]["/readyz told the truth"]["pass"], a["criteria"]["/readyz told the truth"]
    ready_while_refusing = [{"t": 5.0, "dt": 0.01, "st": 200}, {"t": 12.5, "dt": 0.01, "st": 200}]
    a = analyse(scenario(steady("compact") + b0, readyz=ready_while_refusing))
    assert a["criteria"]["/readyz told the truth"]["value"]["ready while down"] == 1


def test_once_the_variant_answers_again_its_backlog_is_load_not_the_fault():
    """After the restart, clients back from Retry-After at once queue (waits over 2 s) or meet a full
    variant (503 busy): the variant serves, so neither counts against the fault nor makes /readyz a liar.
    A 503 that says "down" after /readyz said ready still does."""
    def b0(why_after_restart):
        recs = [r for r in steady("b0") if not 10 <= r["t"] < 14]
        recs += [dict(rec("b0", 10 + i * 0.1, 0.005, 503), why="down") for i in range(30)]
        recs += [dict(rec("b0", 13.0, 0.5), variant="b0")]  # the first answer after the restart
        recs += [dict(rec("b0", 13.1 + i * 0.05, 3.0), variant="b0") for i in range(10)]  # queued behind it
        recs += [dict(rec("b0", 13.6, 0.005, 503), why=why_after_restart)]
        return recs

    polls = [{"t": 5.0, "dt": 0.01, "st": 200}, {"t": 13.4, "dt": 0.01, "st": 200}]
    a = analyse(scenario(steady("compact") + b0("busy"), readyz=polls, variant="b0"))
    assert a["criteria"]["touched: 200 or refusal within 100 ms"]["pass"], a["criteria"]
    assert a["criteria"]["/readyz told the truth"]["pass"], a["criteria"]["/readyz told the truth"]
    a = analyse(scenario(steady("compact") + b0("down"), readyz=polls, variant="b0"))
    assert a["criteria"]["/readyz told the truth"]["pass"]  # 13.4 s is after its first answer (13.0 s)
    early = [{"t": 5.0, "dt": 0.01, "st": 200}, {"t": 12.5, "dt": 0.01, "st": 200}]
    a = analyse(scenario(steady("compact") + b0("busy"), readyz=early, variant="b0"))
    assert a["criteria"]["/readyz told the truth"]["value"]["ready while down"] == 1  # still refusing as down


def test_a_replica_that_loads_after_its_route_recovered_belongs_to_the_restart():
    """One of two replicas killed: the route answers at once, but the new process loads its checkpoint
    until 16 s; the untouched streams' slow seconds meanwhile are the restart's, not a failure."""
    slow = [dict(r, dt=0.2) if 10 <= r["t"] < 16 else r for r in steady("compact")]
    sc = scenario(slow + steady("b0"), counted_down=False)
    assert analyse(sc)["criteria"]["untouched: p99 within 25% or 20 ms"]["pass"] is False
    sc["marks"] = dict(sc["marks"], replicas_up=16.0)
    assert analyse(sc)["criteria"]["untouched: p99 within 25% or 20 ms"]["pass"] is True


def test_readyz_timeouts_while_the_gateway_process_is_gone_are_not_lies_but_after_it_they_are():
    recs = [r for r in steady("b0") + steady("compact") if not 10 <= r["t"] < 18]
    polls = [{"t": 5.0, "dt": 0.01, "st": 200}, {"t": 12.0, "dt": 1.0, "st": "timeout"},
             {"t": 16.0, "dt": 1.0, "st": "timeout"}]
    sc = scenario(recs, readyz=polls, kind="gateway", touched=[], check_untouched=False, check_refusals=False,
                  check_recovery=False)
    v = analyse(sc)["criteria"]["/readyz told the truth"]
    assert v["pass"] and v["value"]["timeouts while the gateway process was gone (not ready)"] == 2, v
    late = polls + [{"t": 19.0, "dt": 1.0, "st": "timeout"}]  # the gateway answers again from 18 s
    assert analyse(dict(sc, readyz=late))["criteria"]["/readyz told the truth"]["value"]["timeouts"] == 1


def test_sigterm_counts_resets_only_of_requests_in_flight_at_the_signal():
    recs = [rec("b0", 9.5, dt=1.0, st=0, e="reset"), rec("b0", 9.9, dt=0.5), rec("b0", 11.0, st=0, e="reset")]
    v = sigterm_verdict(recs, 10.0)
    assert v["value"]["resets"] == 1 and not v["pass"]
    assert v["value"]["sent after"] == {"reset": 1}


# -- the short run against a real server ----------------------------------------------------------------


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    from loadtest.chaos import ChaosConfig, execute
    from tests.support.fake_store import make_fake_store

    home = tmp_path_factory.mktemp("chaos-store")
    config = make_fake_store(home, {"b0": ("b0", "fashion-mnist"), "compact": ("compact", "fashion-mnist")},
                             shadow=None)
    served = yaml.safe_load(config.read_text())
    if "drain_grace_s" in {f.name for f in dataclasses.fields(ServerConfig)}:
        served["server"]["drain_grace_s"] = 5  # a short drain: the test waits for the stop
    config.write_text(yaml.safe_dump(served, sort_keys=False))
    cfg = ChaosConfig(config=str(config), store_home=str(home), scenarios=["kill-worker", "hang-worker", "sigterm"],
                      default_clients=2, max_clients=4, before_s=2, after_s=1.5, window_s=10, settle_s=0.5,
                      hang_s=4, detect_s=3.0, request_timeout_s=8, sigterm_wait_s=12, max_total_s=240, ready_timeout_s=150,
                      reports_dir=str(tmp_path_factory.mktemp("chaos-reports")), name="short")
    out, results = execute(cfg, log=print)
    return out, {sc["name"]: sc for sc in results["scenarios"]}, results


def _criterion(sc: dict, name: str) -> dict:
    return sc["analysis"]["criteria"][name]


@pytest.mark.server
def test_the_short_run_writes_its_report_and_runs_every_scenario(short_run):
    out, scenarios, results = short_run
    assert set(scenarios) == {"kill-worker", "hang-worker", "sigterm"}
    assert not [s for s in scenarios.values() if s.get("skipped")], [s.get("skipped") for s in scenarios.values()]
    assert json.loads((out / "results.json").read_text())["run"] == "short"
    report = (out / "report.md").read_text()
    assert "| kill-worker |" in report and "## sigterm" in report
    assert set(results["streams"]) == {"fashion", "b0", "compact"}


@pytest.mark.server
@pytest.mark.parametrize("name", ["kill-worker", "hang-worker"])
def test_a_failed_worker_costs_no_other_variant_an_error(short_run, name):
    sc = short_run[1][name]
    assert sc["analysis"]["streams"]["compact"]["role"] == "untouched"
    assert _criterion(sc, "untouched: 0 errors")["pass"], _criterion(sc, "untouched: 0 errors")


@pytest.mark.server
@pytest.mark.parametrize("name", ["kill-worker", "hang-worker"])
def test_a_failed_worker_answers_its_own_requests_with_503_not_a_hang_or_a_reset(short_run, name):
    sc = short_run[1][name]
    streams = sc["analysis"]["streams"]["b0"]
    during = streams["during"]["statuses"]
    assert set(during) <= {"200", "503", "429"}, during


@pytest.mark.server
@pytest.mark.parametrize("name", ["kill-worker", "hang-worker"])
def test_a_failed_worker_serves_again_once_restarted_or_resumed(short_run, name):
    sc = short_run[1][name]
    assert sc["analysis"]["recovery_s"]["b0"] is not None, sc["analysis"]["recovery_s"]


@pytest.mark.server
@pytest.mark.parametrize("name", ["kill-worker", "hang-worker"])
def test_readyz_answers_in_time_and_is_not_ready_while_a_worker_is_down(short_run, name):
    v = _criterion(short_run[1][name], "/readyz told the truth")["value"]
    assert v["timeouts"] == 0 and v["ready while down"] == 0, v


@pytest.mark.server
def test_sigterm_under_load_resets_no_admitted_request_and_readyz_turns_unready(short_run):
    sc = short_run[1]["sigterm"]
    assert _criterion(sc, "sigterm: 0 resets of admitted requests")["pass"], _criterion(
        sc, "sigterm: 0 resets of admitted requests")
    v = _criterion(sc, "/readyz told the truth")["value"]
    assert v["timeouts"] == 0 and v["ready while down"] == 0, v
    assert _criterion(sc, "stopped within 30 s")["pass"], _criterion(sc, "stopped within 30 s")
