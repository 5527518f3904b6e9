"""service/experiments/policy.py: the bandit policy of a route, from the configuration to the split it
computes from feedback; and that a route keeps its policy through the saved form of a live change."""
from __future__ import annotations

import pytest

from service.config import ConfigError, parse_config, parse_route
from service.experiments.policy import BanditPolicy, moved, next_split
from service.experiments.records import VariantSummary
from service.route_state import route_dict

VARIANTS = {v: {"model": f"{v}-fashion-mnist"} for v in ("b0", "mec", "compact")}


def _route(**extra):
    return parse_config({"variants": VARIANTS,
                         "routes": {"fashion": {"split": {"b0": 1, "mec": 1, "compact": 1}, **extra}}}).routes["fashion"]


def test_a_bandit_is_configured_by_name_or_with_its_settings():
    assert _route(control="b0", policy="bandit").policy == BanditPolicy()
    p = _route(control="b0", policy={"bandit": {"floor": 0.1, "every_s": 5, "cost_per_ms": 0.001}}).policy
    assert (p.floor, p.every_s, p.cost_per_ms) == (0.1, 5.0, 0.001)
    assert _route().policy is None


@pytest.mark.parametrize("policy, control, words", [
    ("bandit", None, "control"),
    ("greedy", "b0", "expected `bandit`"),
    ({"bandit": {"floor": 0.4}}, "b0", "more than the whole traffic"),
    ({"bandit": {"every_s": 0.1}}, "b0", "at least 1 s"),
    ({"bandit": {"speed": 1}}, "b0", "the keys are"),
    ({"bandit": {"floor": -1}}, "b0", ">= 0"),
    ({"bandit": {"floor": True}}, "b0", ">= 0"),
])
def test_a_bad_policy_is_a_configuration_error_naming_it(policy, control, words):
    with pytest.raises(ConfigError, match="policy") as e:
        _route(policy=policy, **({"control": control} if control else {}))
    assert words in str(e.value)


def test_a_route_keeps_its_control_and_policy_through_its_saved_form():
    r = _route(control="b0", policy={"bandit": {"floor": 0.1, "every_s": 5}})
    again = parse_route("fashion", route_dict(r), VARIANTS)
    assert again == r


def _row(variant, labelled, correct, p50=10.0, shadow=False):
    return VariantSummary(variant, shadow, labelled + 5, labelled, correct, p50, p50, p50)


def test_the_split_follows_feedback_keeps_its_floor_and_ignores_shadows():
    split = {"b0": 1 / 3, "mec": 1 / 3, "compact": 1 / 3}
    rows = [_row("b0", 200, 120), _row("mec", 200, 190), _row("compact", 200, 150),
            _row("compact", 200, 200, shadow=True)]  # a shadow's answers were given to nobody
    new = next_split(BanditPolicy(floor=0.05), split, rows, rng=1)
    assert new["mec"] > 0.85 and min(new.values()) >= 0.05 - 1e-9 and sum(new.values()) == pytest.approx(1)
    assert moved(split, new) and not moved(new, dict(new))
    unknown = next_split(BanditPolicy(), split, [], rng=1)  # no feedback yet: no variant is favoured
    assert max(unknown.values()) - min(unknown.values()) < 0.05


def test_a_latency_cost_favours_the_faster_of_two_equally_right_variants():
    split = {"b0": 0.5, "mec": 0.5}
    rows = [_row("b0", 400, 360, p50=10.0), _row("mec", 400, 360, p50=60.0)]
    assert next_split(BanditPolicy(cost_per_ms=0.002), split, rows, rng=2)["b0"] > 0.9


def test_promote_moves_the_split_to_a_variant_only_once_it_beats_the_control():
    from service.experiments.policy import PromotePolicy

    r = _route(control="b0", policy="promote")
    assert r.policy == PromotePolicy()
    split = {"b0": 0.5, "mec": 0.25, "compact": 0.25}
    few = [_row("b0", 40, 28), _row("mec", 40, 38), _row("compact", 40, 30)]
    assert r.policy.next_split(split, few, "b0") == split  # 40 labels each: still collecting
    many = [_row("b0", 1500, 1050), _row("mec", 1500, 1400), _row("compact", 1500, 1200),
            _row("compact", 1500, 1500, shadow=True)]
    assert r.policy.next_split(split, many, "b0") == {"b0": 0.0, "mec": 1.0, "compact": 0.0}
    half = PromotePolicy(share=0.8).next_split(split, many, "b0")
    assert half["mec"] == 0.8 and half["b0"] == pytest.approx(0.1)
    worse = [_row("b0", 1500, 1400), _row("mec", 1500, 1050), _row("compact", 1500, 1100)]
    assert r.policy.next_split(split, worse, "b0") == split  # the control is best: nothing to promote


def test_a_promoted_route_keeps_its_control_at_weight_zero_and_its_saved_form():
    r = parse_config({"variants": VARIANTS, "routes": {"fashion": {
        "split": {"b0": 0, "mec": 1, "compact": 0}, "control": "b0", "policy": {"promote": {"share": 1}}}}}
    ).routes["fashion"]
    assert r.control == "b0" and parse_route("fashion", route_dict(r), VARIANTS) == r
    with pytest.raises(ConfigError, match="promote"):
        _route(control="b0", policy={"promote": {"share": 1.5}})
