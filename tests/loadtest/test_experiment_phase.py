"""The experiment phase's pure parts: the serving config it derives, its looks, and its report section."""
from collections import Counter

from loadtest.analysis import locust_classify_count
from loadtest.experiment import WEAK_VARIANT, choose_control, decided, experiment_config, point
from loadtest.experiment_report import decision_point, markdown_lines, offline_on, summarise_experiment

BASE = {"variants": {"b0": {"model": "b0-fashion-mnist:latest"}, "mec": {"model": "mec:latest"}},
        "routes": {"fashion": {"split": {"b0": 0.5, "mec": 0.5}, "shadow": {"variant": "mec", "fraction": 0.2}},
                   "imagenet": {"split": {"lite0": 1.0}}}}


def test_the_experiment_config_adds_the_weak_variant_at_the_controls_weight_and_a_fresh_database(tmp_path):
    cfg = experiment_config(BASE, "fashion", "compact-weak", tmp_path / "e.sqlite3")
    route = cfg["routes"]["fashion"]
    assert route["control"] == "b0" and route["split"] == {"b0": 0.5, "mec": 0.5, WEAK_VARIANT: 0.5}
    assert cfg["variants"][WEAK_VARIANT]["model"] == "compact-weak:latest"
    assert cfg["server"]["experiments_db"] == str(tmp_path / "e.sqlite3")
    assert "control" not in BASE["routes"]["fashion"] and WEAK_VARIANT not in BASE["variants"]  # a copy


def test_the_control_is_the_routes_own_else_b0_else_the_heaviest_first():
    assert choose_control({"split": {"b0": 0.2, "mec": 0.8}, "control": "mec"}) == "mec"
    assert choose_control({"split": {"b0": 0.2, "mec": 0.8}}) == "b0"
    assert choose_control({"split": {"compact": 0.5, "mec": 0.5}}) == "compact"
    assert choose_control({"split": {"compact": 0.2, "mec": 0.8}}) == "mec"


def _answer(weak_status: str, n: int) -> dict:
    return {"control": "b0", "status": "collecting", "variants": [
        {"variant": "b0", "role": "control", "requests": 2 * n, "labelled": n, "correct": int(0.86 * n),
         "accuracy": 0.86, "accuracy_95": [0.8, 0.9]},
        {"variant": WEAK_VARIANT, "role": "treatment", "requests": 2 * n, "labelled": n, "correct": int(0.7 * n),
         "accuracy": 0.7, "accuracy_95": [0.6, 0.8],
         "vs_control": {"status": weak_status, "difference": -0.16, "low": -0.25, "high": -0.05}},
        {"variant": "mec", "role": "shadow", "requests": 9, "labelled": 5, "correct": 4, "accuracy": 0.8,
         "accuracy_95": [0.4, 0.96], "vs_control": {"status": "collecting"}}]}


def test_a_look_counts_the_served_variants_and_the_decision_is_the_first_decided_look():
    looks = [point(_answer("collecting", 100), 1.0), point(_answer("worse", 300), 2.0),
             point(_answer("worse", 400), 3.0)]
    assert looks[0]["labelled"] == 200 and looks[0]["requests"] == 400  # the shadow is not a served answer
    assert not decided(looks[0], WEAK_VARIANT) and decided(looks[1], WEAK_VARIANT)
    assert not decided(looks[1], "b0")  # the control is never "decided"
    d = decision_point(looks, WEAK_VARIANT)
    assert d == {"t_s": 2.0, "status": "worse", "requests": 1200, "labelled": 600, "variant_labelled": 300,
                 "control_labelled": 300}
    assert decision_point(looks[:1], WEAK_VARIANT) is None


def test_offline_accuracy_is_taken_on_the_answers_that_got_feedback():
    by_image = Counter({("fashion-mnist/0", 9): 3, ("fashion-mnist/1", 1): 1})
    labels = {"fashion-mnist/0": {9}, "fashion-mnist/1": {2}}
    assert offline_on(by_image, {"fashion-mnist/0": 9, "fashion-mnist/1": 2}, labels) == 1.0
    assert offline_on(by_image, {"fashion-mnist/0": 9, "fashion-mnist/1": 0}, labels) == 0.75
    assert offline_on(by_image, {"error": "no store"}, labels) is None


def test_feedback_rows_are_not_classify_requests():
    stats = {"split fashion:b0": {"count": 10}, "feedback b0": {"count": 10}, "Aggregated": {"count": 20}}
    assert locust_classify_count(stats) == 10


def test_the_summary_puts_online_beside_offline_and_names_the_decision():
    tally = {"variants": {"b0": {"feedback": 2, "feedback_correct": 2, "feedback_by_image": {"fashion-mnist/0": {"9": 2}}},
                          WEAK_VARIANT: {"feedback": 2, "feedback_correct": 1,
                                         "feedback_by_image": {"fashion-mnist/0": {"9": 1}, "fashion-mnist/1": {"0": 1}}}}}
    results = {
        "config": {"fashion_images": 2},
        "variants": {v: {"route": "fashion", "num_classes": 10} for v in ("b0", WEAK_VARIANT, "mec")},
        "offline_top1": {"b0": {"fashion-mnist/0": 9, "fashion-mnist/1": 2},
                         WEAK_VARIANT: {"fashion-mnist/0": 9, "fashion-mnist/1": 0}},
        "steps": [{"kind": "experiment", "tally": tally, "cpu": {"wall_s": 12.0}}],
        "experiment": {"route": "fashion", "weak": WEAK_VARIANT, "users": 8, "feedback_share": 1.0, "max_s": 90,
                       "trajectory": [point(_answer("collecting", 100), 1.0), point(_answer("worse", 300), 2.0)],
                       "final": _answer("worse", 300)},
    }
    e = summarise_experiment(results)
    rows = {r["variant"]: r for r in e["variants"]}
    assert rows["b0"]["offline_same_images"] == 1.0 and rows[WEAK_VARIANT]["offline_same_images"] == 0.5
    assert rows[WEAK_VARIANT]["acknowledged"] == 2 and rows["mec"]["acknowledged"] is None
    assert e["weak_detected_worse"] and e["decision"]["labelled"] == 600 and e["distinct_images"] == 2
    assert e["predicted_labelled_per_arm"] > 0
    text = "\n".join(markdown_lines(e))
    assert f"`{WEAK_VARIANT}` is **worse** than `b0` after 600 labelled answers" in text
    assert "| weak | treatment | 600 | 300 (2) | 70.0% [60.0%, 80.0%] | 50.0% | 2 | -16.0 [-25.0, -5.0] pts | worse |" in text
    assert summarise_experiment({"experiment": {"weak_train_s": 0.0}}) is None
