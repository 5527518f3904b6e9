"""Routing (service.routing): sticky and random splits, explicit variants, shadows; pure functions."""
import random
from collections import Counter

import pytest

from service.config import parse_config
from service.routing import Router, RoutingError, pick_by_weight, sticky_pick
from tests.service.fakes import CFG


def router(seed=0):
    return Router(parse_config(CFG), rng=random.Random(seed))


def test_same_client_id_always_gets_the_same_variant():
    r = router()
    assert len({r.assign(client_id="client-42").variant for _ in range(20)}) == 1
    # and in a fresh router (another process): the hash is stable, not Python's salted hash()
    assert router(seed=9).assign(client_id="client-42").variant == r.assign(client_id="client-42").variant


def test_two_thousand_client_ids_split_within_4_points_of_the_weights():
    r = router()
    counts = Counter(r.assign(client_id=f"user-{i}").variant for i in range(2000))
    for variant, weight in {"b0": 0.5, "mec": 0.25, "compact": 0.25}.items():
        assert abs(counts[variant] / 2000 - weight) < 0.04, counts


def test_without_client_id_the_split_is_random_by_weight():
    r = router()
    counts = Counter(r.assign().variant for _ in range(4000))
    assert abs(counts["b0"] / 4000 - 0.5) < 0.04 and set(counts) == {"b0", "mec", "compact"}
    assert r.assign().how == "split" and r.assign().route == "fashion"


def test_explicit_variant_wins_and_finds_its_route():
    r = router()
    a = r.assign(variant="lite0", client_id="x")
    assert (a.route, a.variant, a.how, a.shadow) == ("imagenet", "lite0", "explicit", None)
    assert r.assign(route="imagenet").how == "default"  # one variant: nothing was chosen


@pytest.mark.parametrize("kwargs, message", [
    ({"variant": "nope"}, "unknown variant 'nope'; variants: b0, mec, compact, lite0"),
    ({"route": "nope"}, "unknown route 'nope'; routes: fashion, imagenet"),
    ({"route": "imagenet", "variant": "b0"}, "variant 'b0' is not in route 'imagenet'; its variants: lite0"),
    ({"variant": "x" * 10_000}, r"unknown variant 'x{63}\.\.\. .10,000 characters.; variants: b0, mec"),
])
def test_routing_errors_list_the_valid_names(kwargs, message):
    with pytest.raises(RoutingError, match=message.replace("(", r"\(")):
        router().assign(**kwargs)


def test_shadow_mirrors_only_other_primaries():
    r = router()
    for i in range(50):
        a = r.assign(client_id=str(i))
        assert a.shadow == (None if a.variant == "mec" else "mec")


def test_pick_by_weight_covers_the_unit_interval():
    split = {"a": 0.2, "b": 0.8}
    assert pick_by_weight(split, 0.0) == "a" and pick_by_weight(split, 0.19) == "a"
    assert pick_by_weight(split, 0.2) == "b" and pick_by_weight(split, 0.999999) == "b"


@pytest.mark.parametrize("before, after", [
    ({"b0": 0.5, "mec": 0.25, "compact": 0.25}, {"b0": 0.6, "mec": 0.2, "compact": 0.2}),
    ({"b0": 0.95, "compact": 0.05}, {"b0": 0.75, "compact": 0.25}),  # a canary step
])
def test_a_weight_change_moves_only_the_clients_that_must_move(before, after):
    ids = [f"user-{i}" for i in range(5000)]
    a = {c: sticky_pick("fashion", c, before) for c in ids}
    b = {c: sticky_pick("fashion", c, after) for c in ids}
    moved = [(a[c], b[c]) for c in ids if a[c] != b[c]]
    gained = {v for v in after if after[v] > before.get(v, 0)}
    assert all(old not in gained and new in gained for old, new in moved), Counter(moved)
    need = sum(max(0.0, after[v] - before.get(v, 0)) for v in after)
    assert abs(len(moved) / len(ids) - need) < 0.02
    for v, w in after.items():
        assert abs(sum(x == v for x in b.values()) / len(ids) - w) < 0.02
