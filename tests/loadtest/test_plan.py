"""`effnet plan`: the capacity model on a small set of figures, the readers of each recorded format, and
one run of the command."""
from __future__ import annotations

import json

import pytest

from cli.main import main
from loadtest import analysis
from loadtest.plan import (
    RESULTS,
    Load,
    Point,
    Run,
    best_within,
    load_runs,
    make_plan,
    profile_name,
    route_loads,
    run_from_report,
    run_from_results,
    runs_from_gpu_session,
    size,
)
from loadtest.report import markdown
from service.config import parse_config

VARIANTS = {"b0": {"model": "b0:latest"}, "mec": {"model": "mec:latest"}, "compact": {"model": "compact:latest"}}
FASHION = {"split": {"b0": 0.5, "mec": 0.25, "compact": 0.25}, "shadow": {"variant": "mec", "fraction": 0.2}}


def _run(points, profile="cpu-2c", date="2026-01-02 03:04", order=0, source="a.md"):
    return Run(source, "load test x", date, "Test CPU, 2 cores, no GPU", profile,
               {v: tuple(Point(*p) for p in ps) for v, ps in points.items()}, order)


# --- the model -------------------------------------------------------------------------------------------

def test_replicas_are_the_load_over_the_best_step_within_the_p99_rounded_up():
    run = _run({"b0": [(1, 100.0, 20.0), (4, 300.0, 60.0), (16, 400.0, 180.0), (32, 450.0, 400.0)]})
    s = size(Load("b0", 1.0, 1000.0, "split 100%"), run, p99_ms=250)
    assert s.point == Point(16, 400.0, 180.0) and s.replicas == 3  # 1000 / 400 = 2.5
    assert s.capacity_rps == 1200.0 and s.headroom == pytest.approx(0.2)
    assert size(Load("b0", 1.0, 1000.0, ""), run, p99_ms=100).replicas == 4  # 300 per replica within 100 ms
    assert size(Load("b0", 1.0, 1200.0, ""), run, p99_ms=250).replicas == 3  # an exact multiple needs none more
    assert size(Load("b0", 1.0, 1000.0, ""), run, p99_ms=250, spare=0.25).replicas == 4  # 1250 / 400


def test_no_step_within_the_p99_means_cannot_meet_with_the_closest_step_shown():
    run = _run({"b0": [(1, 100.0, 20.0), (4, 300.0, 60.0)]})
    s = size(Load("b0", 1.0, 500.0, ""), run, p99_ms=10)
    assert s.replicas is None and s.point is None and s.closest == Point(1, 100.0, 20.0)


def test_a_step_with_more_than_one_percent_errors_does_not_count():
    steps = (Point(4, 300.0, 60.0), Point(16, 900.0, 80.0, error_rate=0.05))
    assert best_within(steps, 250) == Point(4, 300.0, 60.0)


def test_a_variant_not_measured_on_a_profile_keeps_that_profile_from_meeting_the_target():
    runs = [_run({"b0": [(4, 300.0, 60.0)], "mec": [(4, 200.0, 70.0)]}, profile="cpu-2c"),
            _run({"b0": [(16, 400.0, 60.0)]}, profile="gpu", source="g.json")]
    loads = [Load("b0", 0.5, 500.0, ""), Load("mec", 0.5, 500.0, "")]
    plan = make_plan("fashion", 1000, loads, runs, p99_ms=100)
    cpu, gpu = plan.profiles  # the one that meets first
    assert cpu.profile == "cpu-2c" and cpu.meets and cpu.replicas == 2 + 3
    assert cpu.headroom == pytest.approx(min(600 / 500, 600 / 500) - 1)
    assert gpu.profile == "gpu" and not gpu.meets and gpu.replicas is None
    assert [s.run is None for s in gpu.sizings] == [False, True]
    assert [p.profile for p in make_plan("fashion", 1000, loads, runs, 100, profiles=["gpu"]).profiles] == ["gpu"]
    with pytest.raises(ValueError, match="profiles: cpu-2c, gpu"):
        make_plan("fashion", 1000, loads, runs, 100, profiles=["tpu"])


def test_each_profile_uses_its_newest_run_and_never_mixes_steps_of_two_runs():
    older = _run({"b0": [(4, 900.0, 50.0)]}, date="2026-01-01 00:00", source="old.md")
    newer = _run({"b0": [(4, 300.0, 50.0), (16, 400.0, 300.0)]}, date="2026-01-02 00:00", source="new.md")
    same_date_later_stage = _run({"b0": [(16, 350.0, 90.0)]}, date="2026-01-02 00:00", order=1, source="new.json")
    for runs, used, replicas in (([newer, older], "new.md", 4), ([older, newer, same_date_later_stage], "new.json", 3)):
        (plan,) = make_plan("r", 1000, [Load("b0", 1.0, 1000.0, "")], runs, p99_ms=250).profiles
        assert plan.sizings[0].run.source == used and plan.replicas == replicas


def test_a_split_with_a_shadow_loads_the_shadow_with_its_fraction_of_the_others_traffic():
    cfg = parse_config({"variants": VARIANTS, "routes": {"fashion": FASHION}})
    loads = {x.variant: x for x in route_loads(cfg, "fashion", 1000)}
    assert loads["b0"].rps == 500 and loads["compact"].rps == 250
    assert loads["mec"].rps == pytest.approx(250 + 0.2 * 750) and "shadow" in loads["mec"].why
    with pytest.raises(ValueError, match="routes: fashion"):
        route_loads(cfg, "imagenet", 1000)


def test_a_policy_route_sizes_every_variant_for_all_of_its_traffic():
    cascade = {"split": ["compact", "b0"], "policy": {"cascade": {"stages": ["compact", "b0"], "thresholds": [0.8]}}}
    budget = {"split": ["compact", "b0"], "control": "b0", "policy": "budget"}
    cfg = parse_config({"variants": VARIANTS, "routes": {"c": cascade, "b": budget, "fashion": FASHION}})
    for route in ("c", "b"):
        loads = route_loads(cfg, route, 1000)
        assert sorted(x.variant for x in loads) == ["b0", "compact"] and all(x.rps == 1000 for x in loads)
    assert "first stage" in route_loads(cfg, "c", 1000)[0].why


def test_a_profile_is_the_gpu_model_or_the_cpu_family_and_its_cores():
    assert profile_name("AMD EPYC 7B13", 2, None) == "epyc-2c"
    assert profile_name("Intel(R) Xeon(R) Processor", 4, None) == "xeon-4c"
    assert profile_name(None, 16, "NVIDIA H100 80GB HBM3") == "h100"
    assert profile_name("whatever", 16, "NVIDIA A100-SXM4-80GB") == "a100"


# --- the recorded formats --------------------------------------------------------------------------------

STEPS = {"b0": [(1, 97.5, 18.0), (4, 211.0, 33.0), (16, 343.5, 62.0)], "mec": [(1, 93.5, 19.0), (4, 201.0, 340.0)]}


def _results():
    """A load test's results.json with the steps above (throughput and p99 as the service measured them)."""
    steps = []
    for v, points in STEPS.items():
        for users, thr, p99 in points:
            steps.append({"phase": v, "kind": "variant", "route": "fashion", "users": users, "load_s": 10,
                          "cpu": {"service_s": 5, "locust_s": 2, "wall_s": 10, "cores": 2},
                          "stats": {f"classify {v}": {"count": 10, "failures": 0, "rps": thr + 1, "p50_ms": 5,
                                                      "p95_ms": 9, "p99_ms": p99 + 7}},
                          "prometheus": {"all": {"requests": 10}, v: {
                              "requests": 10, "ok": 10, "errors": 0, "error_rate": 0.0, "throughput": thr,
                              "latency_s": {"p50": 0.005, "p95": 0.009, "p99": p99 / 1000}}}})
    return {"run": "fixture", "date": "2026-01-02T03:04:05+00:00", "ended": "2026-01-02T03:10:00+00:00",
            "config": {"steps": [1, 4, 16], "slo_ms": 250}, "machine": {"cpu": "AMD EPYC 7B13", "cores": 2},
            "variants": {v: {"route": "fashion", "num_classes": 10} for v in STEPS}, "steps": steps}


def _expected():
    return {v: tuple(Point(u, thr, p99) for u, thr, p99 in ps) for v, ps in STEPS.items()}


def test_a_results_json_and_the_report_rendered_from_it_give_the_same_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(analysis, "image_set", lambda name, n=200: ())  # no dataset needed for the tables
    results = _results()
    (tmp_path / "results.json").write_text(json.dumps(results))
    results["summary"] = analysis.summarise(results)
    (tmp_path / "loadtest-0304.md").write_text(markdown(results))
    from_json, from_md = run_from_results(tmp_path / "results.json"), run_from_report(tmp_path / "loadtest-0304.md")
    assert from_json.points == from_md.points == _expected()
    assert from_json.profile == from_md.profile == "epyc-2c" and from_md.date == "2026-01-02 03:04"
    assert from_md.machine.startswith("AMD EPYC 7B13, 2 cores, no GPU")
    assert len(load_runs([tmp_path])) == 1  # a report beside its results.json counts once ...
    assert len(load_runs([tmp_path / "loadtest-0304.md"])) == 1  # ... and is read when named


def test_every_gpu_serving_stage_is_a_run_of_the_gpu_profile(tmp_path):
    stage = lambda thr, p99: {"b0_sequential": {"requests": 100, "ok": 100, "p50_ms": 9.0},
                              "b0_concurrent16": {"requests": 800, "ok": 792, "req_per_s": thr, "p99_ms": p99}}
    session = {"call_1": {"date": "2026-01-02 06:35 UTC", "env": {"gpu": "NVIDIA H200", "cpu_count": 16},
                          "serve": stage(400.0, 61.7), "serve_2": stage(280.0, 84.4), "train": {}}}
    (tmp_path / "gpu-session.json").write_text(json.dumps(session))
    first, second = runs_from_gpu_session(tmp_path / "gpu-session.json")
    assert first.profile == second.profile == "h200" and first.order < second.order
    assert first.points == {"b0": (Point(16, 400.0, 61.7, pytest.approx(0.01)),)}
    assert second.source.endswith("gpu-session.json#call_1.serve_2") and "16 cores" in second.machine


def test_every_recorded_load_test_report_is_read():
    reports = sorted(RESULTS.rglob("loadtest-*.md"))
    assert reports
    for path in reports:
        run = run_from_report(path)
        assert run is not None and run.profile and run.date, path
        assert all(len(points) >= 2 for points in run.points.values()), path


# --- the command -----------------------------------------------------------------------------------------

def test_the_command_plans_from_the_given_figures_and_cites_them(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text(json.dumps({"variants": VARIANTS, "routes": {"fashion": FASHION}}))
    figures = tmp_path / "run"
    figures.mkdir()
    (figures / "results.json").write_text(json.dumps(_results()))
    args = ["plan", "--route", "fashion", "--rps", "1000", "--p99", "250", "--results", str(figures),
            "--config", str(tmp_path / "config.yaml")]
    assert main(args + ["--json"]) == 0
    (plan,) = json.loads(capsys.readouterr().out)["profiles"]
    by = {s["variant"]: s for s in plan["variants"]}
    assert by["b0"]["replicas"] == 2 and by["b0"]["per_replica"]["users"] == 16  # 500 / 343.5
    assert by["mec"]["replicas"] == 5 and by["mec"]["per_replica"]["users"] == 1  # 400 / 93.5 (@4: p99 340)
    assert by["compact"]["status"] == "not measured" and not plan["meets"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "epyc-2c" in text and "compact" in text and "not measured" in text
    assert f"{figures / 'results.json'}: load test fixture, 2026-01-02 03:04 UTC" in text
    assert main([*args, "--route", "nope"]) == 2 and "routes: fashion" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([*args[:-4], "--results", str(empty), *args[-2:]]) == 2
    assert "no load-test or GPU serving figures" in capsys.readouterr().err
