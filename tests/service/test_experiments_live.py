"""service/experiments/live.py without a server: which routes run an experiment, labels by name or index,
what is recorded (answers and shadows, only in experiments), and the results against the control."""
from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from service.config import ConfigError, parse_config
from service.errors import ClientError
from service.experiments.live import Experiments

CLASSES = ["T-shirt/top", "Trouser", "Pullover"]


def _cfg(tmp_path, **fashion):
    return parse_config({
        "server": {"experiments_db": str(tmp_path / "exp.sqlite3")},
        "variants": {v: {"model": f"{v}-fashion-mnist"} for v in ("b0", "mec", "compact")},
        "routes": {"fashion": {"split": {"b0": 1, "mec": 1}, **fashion}, "plain": {"split": {"compact": 1}}}})


def test_a_control_is_a_variant_of_the_split(tmp_path):
    assert _cfg(tmp_path, control="b0").routes["fashion"].control == "b0"
    assert _cfg(tmp_path).routes["fashion"].control is None
    for bad in ("compact", "nobody", 3):
        with pytest.raises(ConfigError, match="control"):
            _cfg(tmp_path, control=bad)


def test_only_a_route_with_a_control_is_recorded_and_a_shadow_beside_its_answer(tmp_path):
    ex = Experiments(_cfg(tmp_path, control="b0"), {v: CLASSES for v in ("b0", "mec", "compact")})
    scores = np.array([0.1, 0.7, 0.2])
    ex.answered("r1", "fashion", "b0", "split", scores, 12.0, "client-a")
    ex.shadowed("r1", "fashion", "compact", np.array([0.6, 0.3, 0.1]), 8.0)
    ex.answered("r2", "plain", "compact", "split", scores, 9.0, None)  # no experiment: not recorded
    got = asyncio.run(ex.feedback(json.dumps({"request_id": "r1", "label": "Trouser"}).encode()))
    assert got["correct"] is True and got["shadows"] == [{"variant": "compact", "correct": False}]
    with pytest.raises(ClientError) as e:
        asyncio.run(ex.feedback(json.dumps({"request_id": "r2", "label": 1}).encode()))
    assert e.value.status == 404
    result = asyncio.run(ex.results("fashion"))
    rows = {(v["variant"], v["role"]): v for v in result["variants"]}
    assert (rows[("b0", "control")]["labelled"], rows[("b0", "control")]["correct"]) == (1, 1)
    assert (rows[("compact", "shadow")]["labelled"], rows[("compact", "shadow")]["correct"]) == (1, 0)
    assert rows[("compact", "shadow")]["vs_control"]["status"] == "collecting"
    ex.close()


def test_without_any_experiment_nothing_is_opened_and_feedback_is_404(tmp_path):
    ex = Experiments(_cfg(tmp_path), {v: CLASSES for v in ("b0", "mec", "compact")})
    ex.answered("r1", "fashion", "b0", "split", np.array([1.0, 0, 0]), 1.0, None)
    with pytest.raises(ClientError) as e:
        asyncio.run(ex.feedback(b'{"request_id": "r1", "label": 0}'))
    assert e.value.status == 404 and "control" in str(e.value)
    assert not (tmp_path / "exp.sqlite3").exists()


def test_a_name_that_means_different_classes_in_two_experiments_needs_its_index(tmp_path):
    cfg = parse_config({
        "server": {"experiments_db": str(tmp_path / "exp.sqlite3")},
        "variants": {"a": {"model": "a"}, "b": {"model": "b"}},
        "routes": {"one": {"split": {"a": 1}, "control": "a"}, "two": {"split": {"b": 1}, "control": "b"}}})
    ex = Experiments(cfg, {"a": ["cat", "dog"], "b": ["dog", "cat", "owl"]})
    spaces = ex._spaces()
    assert ex._label("owl", spaces) == 2 and ex._label(2, spaces) == 2
    with pytest.raises(ClientError, match="different classes"):
        ex._label("dog", spaces)
    with pytest.raises(ClientError, match="outside"):
        ex._label(3, spaces)


def test_feedback_needs_the_token_where_a_route_has_a_policy_or_when_configured(tmp_path):
    classes = {v: CLASSES for v in ("b0", "mec", "compact")}

    def needs(auth, **fashion):
        cfg = _cfg(tmp_path, **fashion)
        cfg = type(cfg)(**{**cfg.__dict__, "server": type(cfg.server)(**{**cfg.server.__dict__, "feedback_auth": auth})})
        return Experiments(cfg, classes).needs_token()

    assert needs("auto", control="b0", policy="bandit") and not needs("auto", control="b0")
    assert needs("token", control="b0") and not needs("none", control="b0", policy="bandit")
    # a budget on the manifests' accuracy moves nothing by feedback; on online accuracy it does
    assert not needs("auto", control="b0", policy="budget")
    assert needs("auto", control="b0", policy={"budget": {"accuracy": "online"}})
    assert not needs("auto", control="b0", policy={"cascade": {"stages": ["mec", "b0"], "thresholds": [0.8]}})
    with pytest.raises(ConfigError, match="feedback_auth"):
        parse_config({"server": {"feedback_auth": "maybe"}, "variants": {"b0": {"model": "b0"}},
                      "routes": {"r": {"split": {"b0": 1}}}})
