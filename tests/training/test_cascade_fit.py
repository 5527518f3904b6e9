"""Cascade thresholds from given validation scores (training/cascade_fit.py): known cases worked by hand."""
from __future__ import annotations

import numpy as np
import pytest
import yaml

from training.cascade_fit import ALWAYS, fit, simulate


def _probs(conf: list[float], top: list[int], classes: int = 3) -> np.ndarray:
    """One row per image: `conf` on class `top`, the rest spread evenly."""
    p = np.empty((len(conf), classes))
    for i, (c, t) in enumerate(zip(conf, top)):
        p[i] = (1 - c) / (classes - 1)
        p[i, t] = c
    return p


# Four images, all of class 0. The cheap stage is sure and right on images 0 and 2, unsure and wrong on
# image 1 (0.6), unsure and right on image 3 (0.55); the costly stage is right on all of them.
LABELS = np.zeros(4, int)
CHEAP = _probs([0.9, 0.6, 0.95, 0.55], [0, 1, 0, 0])
STRONG = _probs([0.7, 0.7, 0.7, 0.7], [0, 0, 0, 0])
COSTS = [1.0, 10.0]


def test_simulate_counts_the_stages_each_image_ran():
    f = simulate([CHEAP, STRONG], LABELS, COSTS, [0.9])  # images 1 and 3 escalate
    assert f.accuracy == 1.0 and f.mean_cost == pytest.approx(1 + 10 * 0.5)
    assert f.answered == (0.5, 0.5) and f.escalated == 0.5
    never = simulate([CHEAP, STRONG], LABELS, COSTS, [0.0])
    assert never.accuracy == 0.75 and never.mean_cost == 1.0 and never.escalated == 0.0


def test_no_drop_escalates_just_the_images_the_cheap_stage_gets_wrong_or_nearly():
    r = fit([CHEAP, STRONG], LABELS, COSTS, drop=0.0)
    assert r.chosen.thresholds == (0.9,)  # 0.6 would keep the wrong answer on image 1
    assert r.chosen.accuracy == r.last.accuracy == 1.0
    assert r.chosen.mean_cost == pytest.approx(6.0) and r.last.mean_cost == 10.0


def test_a_drop_of_25_points_lets_the_cheap_stage_answer_everything():
    r = fit([CHEAP, STRONG], LABELS, COSTS, drop=25.0)
    assert r.chosen.escalated == 0.0 and r.chosen.mean_cost == 1.0 and r.chosen.accuracy == 0.75


def test_an_escalation_share_buys_the_best_accuracy_it_allows():
    assert fit([CHEAP, STRONG], LABELS, COSTS, escalate=0.5).chosen.accuracy == 1.0
    quarter = fit([CHEAP, STRONG], LABELS, COSTS, escalate=0.25).chosen
    assert quarter.escalated <= 0.25 and quarter.accuracy == 0.75
    assert quarter.mean_cost == 1.0  # escalating image 3 buys nothing: the cheaper set wins the tie


def test_three_stages_stop_at_the_first_sure_one():
    middle = _probs([0.99, 0.99, 0.5, 0.5], [0, 0, 1, 1])
    r = fit([CHEAP, middle, STRONG], LABELS, [1.0, 3.0, 10.0], drop=0.0)
    assert r.chosen.accuracy == 1.0
    # image 1 is settled by the middle stage; image 3 may stop at the cheap one (0.55, right)
    assert r.chosen.mean_cost < simulate([CHEAP, middle, STRONG], LABELS, [1.0, 3.0, 10.0], [0.9, ALWAYS]).mean_cost


def test_average_last_answers_the_mean_of_the_stages():
    unsure = _probs([0.4, 0.4, 0.4, 0.4], [1, 1, 1, 1])  # wrong alone, outweighed by the sure cheap stage
    f = simulate([CHEAP, unsure], LABELS, COSTS, [ALWAYS], average_last=True)
    assert f.accuracy == 0.75  # image 1: cheap says 1 (0.6), the last says 1 too


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="one target"):
        fit([CHEAP, STRONG], LABELS, COSTS)
    with pytest.raises(ValueError, match="same 4 labelled images"):
        fit([CHEAP, STRONG[:3]], LABELS, COSTS, drop=0.3)
    with pytest.raises(ValueError, match="take 1 threshold"):
        simulate([CHEAP, STRONG], LABELS, COSTS, [0.5, 0.5])


def test_effnet_cascade_fit_writes_the_thresholds_the_route_names(tmp_path, monkeypatch, capsys):
    """The command end to end on tiny fake-data checkpoints: trained without a validation split, so it
    falls back to the test split and says so; the file it writes is what the server then reads."""
    from cli.main import main
    from service.config import load_config
    from tests.support.serving import make_checkpoint
    from training.data import FAKE_CLASSES

    home = tmp_path / "bentoml"
    monkeypatch.setenv("BENTOML_HOME", str(home))
    for name, variant, seed in (("compact-fake", "compact", 1), ("b0-fake", "b0", 2)):
        make_checkpoint(home, name, variant, list(FAKE_CLASSES), 32, seed=seed)
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "variants": {"compact": {"model": "compact-fake:latest"}, "b0": {"model": "b0-fake:latest"}},
        "routes": {"fake": {"split": ["compact", "b0"], "policy": {"cascade": {
            "stages": ["compact", "b0"], "thresholds_file": "cascade-fake.yaml"}}}}}))
    assert main(["cascade", "fit", "fake", "--config", str(config), "--data", "fake", "--escalate", "0.5"]) == 0
    out, err = capsys.readouterr()
    assert "fitting on the test split" in err and "wrote" in out
    written = yaml.safe_load((tmp_path / "cascade-fake.yaml").read_text())
    assert written["split"] == "test" and written["target"] == {"escalate": 0.5}
    assert written["expected"]["escalated"] <= 0.5
    policy = load_config(config).routes["fake"].policy
    assert list(policy.thresholds) == written["thresholds"]
    assert main(["cascade", "fit", "nowhere", "--config", str(config), "--data", "fake"]) == 2
    assert "unknown route" in capsys.readouterr().err


def test_stages_of_different_variants_that_held_out_the_same_images_fit_on_the_validation_split(capsys):
    from types import SimpleNamespace

    from cli.cascade import choose_split

    def man(variant, resolution, seed, val_seed=0, val_images=5000):
        return SimpleNamespace(variant=variant, resolution=resolution, metrics={"val_images": val_images},
                               training={"val_size": -1.0, "val_seed": val_seed, "seed": seed, "data": "fashion-mnist"})

    assert choose_split([man("compact", 40, 0), man("b0", 48, 1)], None) == "val"  # variant, size, seed differ
    assert capsys.readouterr().err == ""
    assert choose_split([man("compact", 40, 0), man("b0", 40, 0, val_seed=1)], None) == "test"
    assert "held out different validation images" in capsys.readouterr().err
    assert choose_split([man("compact", 40, 0), man("b0", 40, 0, val_images=None)], None) == "test"
    assert "without a validation split" in capsys.readouterr().err
