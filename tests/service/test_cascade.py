"""service/cascade.py without a server: the `cascade` policy from the configuration, its thresholds file,
and the run of one request's stages against stand-in variants that answer, doubt, refuse or fail."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import yaml

from service.cascade import CascadePolicy, run_stages
from service.config import ConfigError, parse_config
from service.errors import ClientError
from service.live_routes import with_route
from service.results import InferenceResult
from service.route_state import route_dict

VARIANTS = {v: {"model": f"{v}-fashion-mnist"} for v in ("b0", "mec", "compact")}


def _config(policy, source="<dict>", split=("compact", "b0", "mec")):
    return parse_config({"variants": VARIANTS, "routes": {"fashion": {"split": list(split), "policy": policy}}},
                        source)


def test_a_cascade_is_configured_with_its_stages_and_thresholds():
    p = _config({"cascade": {"stages": ["compact", "b0"], "thresholds": [0.8]}}).routes["fashion"].policy
    assert p == CascadePolicy(("compact", "b0"), (0.8,), False)
    assert p.as_dict() == {"cascade": {"stages": ["compact", "b0"], "thresholds": [0.8], "average_last": False}}


@pytest.mark.parametrize("cascade, words", [
    ({"stages": ["compact"], "thresholds": []}, "two or more different variants"),
    ({"stages": ["compact", "compact"], "thresholds": [0.5]}, "two or more different variants"),
    ({"stages": ["compact", "lite0"], "thresholds": [0.5]}, "not in the route's split"),
    ({"stages": ["compact", "b0"], "thresholds": [0.5, 0.5]}, "list of 1 number"),
    ({"stages": ["compact", "b0"], "thresholds": [-0.1]}, "a number >= 0"),
    ({"stages": ["compact", "b0"], "thresholds": ["high"]}, "a number >= 0"),
    ({"stages": ["compact", "b0"]}, "give `thresholds`"),
    ({"stages": ["compact", "b0"], "thresholds": [0.5], "average_last": "yes"}, "true or false"),
    ({"stages": ["compact", "b0"], "thresholds": [0.5], "speed": 1}, "the keys"),
    ({"stages": ["compact", "b0"], "thresholds_file": "nowhere.yaml"}, "does not exist"),
])
def test_a_bad_cascade_is_a_configuration_error_naming_the_key(cascade, words):
    with pytest.raises(ConfigError, match=r"routes\.fashion\.policy\.cascade") as e:
        _config({"cascade": cascade})
    assert words in str(e.value)


def test_the_thresholds_file_lies_beside_the_configuration_and_is_read_again_on_a_live_change(tmp_path):
    (tmp_path / "cascade-fashion.yaml").write_text(yaml.safe_dump({"stages": ["compact", "b0"], "thresholds": [0.7]}))
    source = tmp_path / "serve.yaml"
    source.write_text("")  # the configuration's folder is where relative files are found
    cfg = _config({"cascade": {"stages": ["compact", "b0"], "thresholds_file": "cascade-fashion.yaml"}}, str(source))
    p = cfg.routes["fashion"].policy
    assert p.thresholds == (0.7,) and p.thresholds_file == str(tmp_path / "cascade-fashion.yaml")
    # a refit while serving: the next live change (or restart with a saved change) reads the file again
    (tmp_path / "cascade-fashion.yaml").write_text(yaml.safe_dump({"stages": ["compact", "b0"], "thresholds": [0.9]}))
    changed, _ = with_route(cfg, "fashion", {**route_dict(cfg.routes["fashion"]), "split": ["compact", "b0", "mec"]},
                            {})
    assert changed.policy.thresholds == (0.9,)


def test_a_thresholds_file_fitted_for_other_stages_is_refused(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"stages": ["mec", "b0"], "thresholds": [0.7]}))
    with pytest.raises(ConfigError, match="fitted for the stages"):
        _config({"cascade": {"stages": ["compact", "b0"], "thresholds_file": str(f)}})


def test_the_policy_loop_never_runs_a_cascade():
    p = _config({"cascade": {"stages": ["compact", "b0"], "thresholds": [0.8]}}).routes["fashion"].policy
    assert p.every_s == float("inf") and p.next_split({"b0": 1.0}, [], None) == {"b0": 1.0}


# one request's stages ---------------------------------------------------------------------------------------

def _answer(top: float) -> InferenceResult:
    scores = np.full((1, 4), (1 - top) / 3, np.float32)
    scores[0, 2] = top
    return InferenceResult(scores, 0.001)


def _run(policy: CascadePolicy, answers: dict, last=None):
    called = []

    async def call(variant):
        called.append(variant)
        a = answers[variant]
        if isinstance(a, Exception):
            raise a
        return a

    return asyncio.run(run_stages(policy, call, last)), called


TWO = CascadePolicy(("compact", "b0"), (0.8,))


def test_a_confident_first_stage_answers_alone():
    out, called = _run(TWO, {"compact": _answer(0.9), "b0": _answer(0.99)})
    assert called == ["compact"] and out.variant == "compact"
    assert [(s.variant, s.escalated) for s in out.steps] == [("compact", False)]


def test_an_unsure_first_stage_escalates_and_the_last_always_answers():
    out, called = _run(TWO, {"compact": _answer(0.5), "b0": _answer(0.3)})
    assert called == ["compact", "b0"] and out.variant == "b0"
    assert [(s.variant, s.escalated) for s in out.steps] == [("compact", True), ("b0", False)]
    assert out.scores[2] == pytest.approx(0.3)


def test_average_last_answers_the_mean_of_the_stages_seen():
    out, _ = _run(CascadePolicy(("compact", "b0"), (0.8,), True), {"compact": _answer(0.5), "b0": _answer(0.7)})
    assert out.averaged and out.scores[2] == pytest.approx(0.6)


@pytest.mark.parametrize("status", [429, 502, 503])
def test_a_stage_that_refuses_or_fails_escalates(status):
    out, called = _run(TWO, {"compact": ClientError("down", status), "b0": _answer(0.6)})
    assert called == ["compact", "b0"] and out.variant == "b0"
    assert out.steps[0].escalated and out.steps[0].error == "down"


def test_a_failing_last_stage_leaves_the_deepest_answer_and_no_answer_its_refusal():
    out, _ = _run(TWO, {"compact": _answer(0.5), "b0": ClientError("b0 is down", 503)})
    assert out.variant == "compact" and out.steps[-1].error == "b0 is down"
    with pytest.raises(ClientError, match="b0 is down"):
        _run(TWO, {"compact": ClientError("compact is down", 503), "b0": ClientError("b0 is down", 503)})


def test_a_bad_image_is_the_answer_not_an_escalation():
    with pytest.raises(ClientError, match="not an image"):
        _run(TWO, {"compact": ClientError("not an image", 400), "b0": _answer(0.9)})


def test_a_budget_can_end_the_cascade_early():
    out, called = _run(TWO, {"compact": _answer(0.5), "b0": _answer(0.9)}, last=1)
    assert called == ["compact"] and out.variant == "compact"
