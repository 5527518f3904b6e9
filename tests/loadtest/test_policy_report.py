"""The policy phases' pieces without a server: the routes added to the config, the figures, the verdicts."""
import pytest

from loadtest.policies import BUDGET_ROUTE, CASCADE_ROUTE, cascade_stages, policy_config, policy_of
from loadtest.policy_report import budget_verdict, cascade_verdict, markdown_lines, plot_cascade, summarise_policies


def variant(acc, *rows, macs=20e6):
    """A variant's summary: accuracy under load and (users, p99 ms, req/s) per step."""
    return {"accuracy": {"under_load": acc, "labelled": 100}, "macs": macs,
            "steps": [{"users": u, "p99_ms": p99, "throughput": thr, "locust": {}} for u, p99, thr in rows]}


def policy_step(route, users, p99_s, thr, tally):
    return {"kind": "policy", "phase": route, "route": route, "users": users, "cpu": {"wall_s": 10, "cores": 2},
            "stats": {f"policy {route}": {"count": 100, "rps": thr, "p99_ms": p99_s * 1000}},
            "prometheus": {"all": {"throughput": thr, "latency_s": {"p99": p99_s}}},
            "tally": {"policy": {route: tally}}}


def test_the_cascade_runs_compact_then_b0_and_falls_back_to_the_routes_first_and_last():
    assert cascade_stages(["b0", "mec", "compact"]) == ["compact", "b0"]
    assert cascade_stages(["compact", "mec"]) == ["compact", "mec"]
    assert cascade_stages(["x", "y", "z"]) == ["x", "z"]
    with pytest.raises(ValueError, match="two variants"):
        cascade_stages(["b0"])


def test_the_policy_routes_cover_the_live_variants_and_leave_out_the_weak_one():
    base = {"variants": {}, "routes": {"fashion": {"split": {"b0": 0.5, "mec": 0, "compact": 0.5, "weak": 0.5}}}}
    cfg = policy_config(base, "fashion", 300, "cascade-fashion-cascade.yaml", leave_out=("weak",))
    assert cfg["routes"][BUDGET_ROUTE] == {"split": {"b0": 1.0, "compact": 1.0},
                                           "policy": {"budget": {"default_ms": 300.0}}}
    assert cfg["routes"][CASCADE_ROUTE]["policy"]["cascade"] == {
        "stages": ["compact", "b0"], "thresholds_file": "cascade-fashion-cascade.yaml"}
    assert "weak" in base["routes"]["fashion"]["split"] and len(base["routes"]) == 1  # the base is untouched
    assert policy_of(cfg["routes"][BUDGET_ROUTE]) == "budget" and policy_of({"policy": None}) is None
    assert policy_of({"policy": {"epsilon_greedy": {}}}) is None


def test_the_cascade_beats_every_variant_only_when_more_accurate_at_equal_throughput():
    variants = {"compact": variant(0.80, (4, 50, 100)), "b0": variant(0.86, (4, 90, 50))}
    r = {"accuracy": 0.88, "variants": ["compact", "b0"], "steps": [
        {"users": 4, "p99_ms": 60, "throughput": 80, "locust": {}}]}
    v = cascade_verdict(r, variants)
    assert not v["beats_every_variant"] and v["why_not"] == ["compact carries more traffic at 4 users"]
    r["steps"][0]["throughput"] = 96  # within 5% of compact's: equal throughput
    assert cascade_verdict(r, variants) == {"beats_every_variant": True, "why_not": []}
    r["accuracy"] = 0.865  # within a point of b0: a tie is no win
    assert "b0 is as accurate" in cascade_verdict(r, variants)["why_not"][0]


def test_the_budget_held_only_where_every_rival_of_equal_or_better_accuracy_missed():
    variants = {"compact": variant(0.80, (4, 50, 100), (16, 120, 130)),
                "b0": variant(0.86, (4, 150, 50), (16, 400, 60)),
                "mec": variant(0.85, (4, 180, 50), (16, 90, 60))}
    r = {"accuracy": 0.855, "budget_ms": 100, "variants": ["compact", "b0", "mec"], "steps": [
        {"users": 4, "p99_ms": 95, "throughput": 70, "locust": {}},
        {"users": 16, "p99_ms": 98, "throughput": 90, "locust": {}}]}
    v = budget_verdict(r, variants)
    # compact is less accurate: no rival; at 16 users mec met the budget too
    assert v["held_where_rivals_missed"] == [4]
    assert v["steps"][1]["rivals"] == {"b0": 400, "mec": 90}


def test_policy_steps_are_summed_per_route_and_rendered_beside_the_variants():
    tally = {"answers": 10, "labelled": 8, "correct": 6, "budget_missed": 1, "answered_by": {"b0": 7, "compact": 3},
             "stages_run": {}}
    ctally = {"answers": 10, "labelled": 10, "correct": 9, "budget_missed": 0, "answered_by": {"b0": 4, "compact": 6},
              "stages_run": {"compact": 10, "b0": 4}}
    results = {"config": {"budget_ms": 100, "slo_ms": 250},
               "routes": {BUDGET_ROUTE: {"policy": {"budget": {}}, "weights": {"compact": 1, "b0": 1}},
                          CASCADE_ROUTE: {"policy": {"cascade": {}}, "weights": {"compact": 1, "b0": 1}}},
               "steps": [policy_step(BUDGET_ROUTE, 4, 0.09, 40.0, tally),
                         policy_step(BUDGET_ROUTE, 16, 0.2, 50.0, tally),
                         policy_step(CASCADE_ROUTE, 4, 0.08, 45.0, ctally)]}
    variants = {"compact": variant(0.7, (4, 50, 60), (16, 90, 80), macs=10e6),
                "b0": variant(0.86, (4, 150, 30), (16, 300, 35), macs=20e6)}
    ps = summarise_policies(results, variants)
    b, c = ps["routes"][BUDGET_ROUTE], ps["routes"][CASCADE_ROUTE]
    assert (b["answers"], b["labelled"], b["correct"], b["budget_missed"]) == (20, 16, 12, 2)
    assert b["answered_by"] == {"b0": 14, "compact": 6} and b["miss_rate"] == 0.1 and b["accuracy"] == 0.75
    assert c["mean_macs"] == (10 * 10e6 + 4 * 20e6) / 10 and c["accuracy"] == 0.9
    assert ps["verdicts"][BUDGET_ROUTE]["held_where_rivals_missed"] == [4]  # b0 missed at 4, the policy held
    assert ps["verdicts"][CASCADE_ROUTE]["beats_every_variant"] is False  # compact carries more at 4 users
    text = "\n".join(markdown_lines(ps, variants, [4, 16]))
    assert f"| **{BUDGET_ROUTE}** | budget (100 ms) | 75.0% (16) | 90, 40.0 | 200, 50.0 | 2 of 20 (10.0%) |" in text
    assert "| b0 | fixed | 86.0% (100) | 150, 30.0 | 300, 35.0 | - |" in text
    assert "Yes, at 4 users.**" in text and "beat every single variant on accuracy at equal throughput? No.**" in text
    assert summarise_policies({"steps": []}, variants) == {} and markdown_lines({}, variants, [4]) == []


def test_the_cascade_panel_draws_the_offline_curve_and_the_measured_point(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = {"compact": variant(0.7, macs=10e6), "b0": variant(0.86, macs=20e6)}
    ps = {"routes": {CASCADE_ROUTE: {"policy": "cascade", "variants": ["compact", "b0"], "mean_macs": 14e6,
                                     "accuracy": 0.85}}}
    curve = {"images": 50, "stages": ["compact", "b0"],
             "points": [{"mean_cost": 10e6, "accuracy": 0.7}, {"mean_cost": 30e6, "accuracy": 0.86}]}
    fig, ax = plt.subplots()
    assert plot_cascade(ax, ps, variants, {"curve": curve})
    assert [tuple(p) for p in ax.lines[0].get_xydata()] == [(10.0, 70.0), (30.0, 86.0)]
    assert any((o.get_offsets() == [[14.0, 85.0]]).all() for o in ax.collections)  # the cascade under load
    assert not plot_cascade(ax, {}, variants, None)
    plt.close(fig)
