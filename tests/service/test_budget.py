"""The latency-budget policy (service/budget.py): the choice from given queue and speed figures, the header,
the policy's configuration, and the request path without a server (a stand-in worker, figures set by hand)."""
import types
import warnings

import pytest
from starlette.applications import Starlette
from starlette.routing import Route

with warnings.catch_warnings():  # starlette asks for httpx2 for its test client; httpx is what is installed
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from service import budget, metrics
from service.budget import FITS, NONE_FITS, UNMEASURED, BudgetPolicy, Figures, choose
from service.config import ConfigError, parse_config, parse_route
from service.errors import ClientError
from service.route_state import route_dict
from tests.service.fakes import RGB, FlakyWorker, encode, gateway

# b0: the most accurate and the slower; compact: the fastest
B0 = Figures("b0", 0.90, ahead=0, seconds_per_image=0.010, parallel=2, service_s=0.010)
MEC = Figures("mec", 0.88, ahead=0, seconds_per_image=0.008, parallel=2, service_s=0.008)
COMPACT = Figures("compact", 0.85, ahead=0, seconds_per_image=0.004, parallel=2, service_s=0.004)


def test_the_prediction_is_the_queue_ahead_at_its_speed_plus_the_service_time():
    f = Figures("b0", 0.9, ahead=10, seconds_per_image=0.010, parallel=2, service_s=0.006)
    assert f.predicted_s() == pytest.approx(10 * 0.010 / 2 + 0.006)
    # a batch of 4 waits for its own first 3 images too
    assert f.predicted_s(images=4) == pytest.approx(13 * 0.010 / 2 + 0.006)
    assert Figures("b0", 0.9, service_s=None).predicted_s() is None


def test_with_nothing_queued_the_most_accurate_answers():
    c = choose([COMPACT, MEC, B0], budget_ms=50)
    assert (c.variant, c.reason, c.missed) == ("b0", FITS, False)
    assert c.predicted_ms == pytest.approx(10.0) and c.budget_ms == 50


def test_a_queue_on_the_most_accurate_moves_the_choice_to_the_next_that_fits():
    busy_b0 = Figures("b0", 0.90, ahead=20, seconds_per_image=0.010, parallel=2, service_s=0.010)  # 110 ms
    assert choose([COMPACT, MEC, busy_b0], budget_ms=50).variant == "mec"
    assert choose([COMPACT, MEC, busy_b0], budget_ms=200).variant == "b0"  # a larger budget affords the queue
    busy_mec = Figures("mec", 0.88, ahead=40, seconds_per_image=0.008, parallel=2, service_s=0.008)  # 168 ms
    c = choose([COMPACT, busy_mec, busy_b0], budget_ms=50)
    assert (c.variant, c.reason) == ("compact", FITS) and c.predicted_ms == pytest.approx(4.0)


def test_when_none_fits_the_fastest_answers_and_the_miss_is_said():
    c = choose([COMPACT, MEC, B0], budget_ms=2)
    assert (c.variant, c.reason, c.missed) == ("compact", NONE_FITS, True)
    assert c.predicted_ms == pytest.approx(4.0)
    # the fastest now, queue included: compact behind a long queue is slower than an idle b0
    busy_compact = Figures("compact", 0.85, ahead=100, seconds_per_image=0.004, parallel=2, service_s=0.004)
    assert choose([busy_compact, B0], budget_ms=2).variant == "b0"


def test_a_variant_not_measured_yet_counts_as_fitting_so_that_it_gets_measured():
    new = Figures("new", 0.95)
    c = choose([COMPACT, new], budget_ms=1)
    assert (c.variant, c.reason, c.predicted_ms) == ("new", UNMEASURED, None)
    # but it does not win on being unmeasured: accuracy still ranks
    assert choose([B0, Figures("new", 0.5)], budget_ms=50).variant == "b0"


def test_equal_accuracy_goes_to_the_faster_and_unknown_accuracy_ranks_last():
    twin = Figures("twin", 0.90, service_s=0.002)
    assert choose([B0, twin], budget_ms=50).variant == "twin"
    assert choose([Figures("unknown", None, service_s=0.001), COMPACT], budget_ms=50).variant == "compact"
    with pytest.raises(ValueError):
        choose([], budget_ms=50)


def test_the_accuracy_figure_prefers_validation_and_online_needs_a_narrow_interval():
    assert budget.offline_accuracy({"top1": 0.86, "val_top1": 0.88}) == 0.88
    assert budget.offline_accuracy({"top1": 0.86}) == 0.86  # checkpoints trained before the validation split
    assert budget.offline_accuracy({}) is None
    assert budget.online_accuracy(2000, 1800, width=0.05) == 0.9
    assert budget.online_accuracy(50, 45, width=0.05) is None  # 95% interval about 0.17 wide: too little
    assert budget.online_accuracy(0, 0, width=0.05) is None


@pytest.mark.parametrize("values, words", [
    (["abc"], "positive number"), (["0"], "positive number"), (["-5"], "positive number"),
    (["1e3"], "positive number"), (["nan"], "positive number"), (["inf"], "positive number"),
    (["1_000"], "positive number"), ([""], "positive number"), (["100, 200"], "positive number"),
    (["100", "200"], "2 times"),
])
def test_a_malformed_budget_header_is_refused_naming_the_header(values, words):
    with pytest.raises(ClientError) as e:
        budget.parse_header(values)
    assert e.value.status == 400 and budget.HEADER in str(e.value) and words in str(e.value)


def test_a_well_formed_budget_header_is_read_in_milliseconds():
    assert budget.parse_header([]) is None
    assert budget.parse_header([" 250 "]) == 250.0 and budget.parse_header(["0.5"]) == 0.5


VARIANTS = {"b0": {"model": "b0:latest"}, "compact": {"model": "compact:latest"}}


def route(policy, control=None):
    return parse_route("fast", {"split": {"b0": 1, "compact": 1}, "policy": policy,
                                **({"control": control} if control else {})}, VARIANTS)


def test_the_policy_has_defaults_and_survives_a_live_change():
    assert route("budget").policy == BudgetPolicy()
    r = route({"budget": {"default_ms": 100, "max_ms": 2000, "accuracy": "online", "online_width": 0.1}}, "b0")
    assert r.policy == BudgetPolicy(100.0, 2000.0, "online", 0.1)
    # PATCH /routes writes the route back and parses it again: the policy stays as it was
    assert parse_route("fast", route_dict(r), VARIANTS).policy == r.policy


@pytest.mark.parametrize("policy, words", [
    ({"budget": {"deadline": 5}}, "the keys are"),
    ({"budget": {"default_ms": 0}}, "default_ms: expected a number > 0"),
    ({"budget": {"max_ms": True}}, "max_ms: expected a number > 0"),
    ({"budget": {"accuracy": "test"}}, "expected val or online"),
    ({"budget": {"default_ms": 500, "max_ms": 100}}, "above max_ms"),
    ({"budget": {"accuracy": "online"}}, "name its `control`"),
])
def test_a_bad_budget_policy_is_a_configuration_error_naming_the_key(policy, words):
    with pytest.raises(ConfigError) as e:
        route(policy)
    assert "routes.fast.policy.budget" in str(e.value) and words in str(e.value)


# the request path, without a server --------------------------------------------------------------------

CFG = {"server": {"worker_transport": "http"}, "variants": VARIANTS,
       "routes": {"fast": {"split": {"b0": 1, "compact": 1}, "policy": {"budget": {"default_ms": 300,
                                                                                   "max_ms": 1000}}},
                  "plain": {"split": {"b0": 1}}}}


@pytest.fixture
def gw():
    from service.dispatch import Dispatcher

    cfg = parse_config(CFG)
    manifests = {v: types.SimpleNamespace(classes=["a", "b", "c"], num_classes=3, resolution=32, resize=None,
                                          metrics=m) for v, m in (("b0", {"top1": 0.86, "val_top1": 0.90}),
                                                                  ("compact", {"top1": 0.85}))}
    g = gateway(cfg, manifests)
    g.dispatcher = g.shadows.dispatcher = Dispatcher(cfg, lambda v: [FlakyWorker(0)], {}, {"b0": 1, "compact": 1})
    # service times given, not measured: the choice below must not depend on this machine's speed
    g.budget.service_s = lambda variant, now, probing=False: {"b0": 0.010, "compact": 0.004}[variant]
    return g


@pytest.fixture
def client(gw):
    app = Starlette(routes=[Route("/classify", gw.classify, methods=["POST"]),
                            Route("/classify_batch", gw.classify_batch, methods=["POST"])])
    with TestClient(app) as c:
        yield c


def classify(client, budget_ms=None, **data):
    headers = {budget.HEADER: budget_ms} if budget_ms is not None else {}
    return client.post("/classify", files={"image": ("a.png", encode(RGB, "PNG"))}, data=data, headers=headers)


def count(counter, *labels):
    return counter.labels(*labels)._value.get()


def test_the_answer_says_what_the_budget_chose_and_why(client):
    before = count(metrics.BUDGET_CHOICES, "fast", "b0")
    body = classify(client, "250", route="fast").json()
    assert (body["variant"], body["assignment"], body["chosen_because"]) == ("b0", "budget", FITS)
    assert body["budget_ms"] == 250 and body["predicted_ms"] == pytest.approx(10.0)
    assert body["budget_missed"] is (body["latency_ms"] > 250)  # predicted to fit: missed only if it came late
    assert count(metrics.BUDGET_CHOICES, "fast", "b0") == before + 1
    assert classify(client, route="fast").json()["budget_ms"] == 300  # no header: the route's default


def test_a_queue_on_the_most_accurate_sends_a_tight_budget_elsewhere(gw, client):
    gw.admission.own["b0"] = 40  # 40 requests admitted ahead: 40 x 10 ms / 2 calls + 10 ms = 210 ms
    try:
        tight = classify(client, "100", route="fast").json()
        loose = classify(client, "500", route="fast").json()
    finally:
        gw.admission.own["b0"] = 0
    assert (tight["variant"], tight["predicted_ms"]) == ("compact", pytest.approx(4.0))
    assert (loose["variant"], loose["predicted_ms"]) == ("b0", pytest.approx(210.0))


def test_a_budget_nothing_meets_gets_the_fastest_and_counts_a_miss(client):
    before = count(metrics.BUDGET_MISSES, "fast", "compact", "none_fits")
    body = classify(client, "1", route="fast").json()
    assert (body["variant"], body["chosen_because"], body["budget_missed"]) == ("compact", NONE_FITS, True)
    assert count(metrics.BUDGET_MISSES, "fast", "compact", "none_fits") == before + 1


def test_a_batch_is_predicted_for_all_its_images(gw, client):
    files = [("images", (f"{i}.png", encode(RGB, "PNG"))) for i in range(4)]
    # b0: 3 images ahead of the last at 10 ms / 2 calls + 10 ms = 25 ms; compact: 10 ms
    body = client.post("/classify_batch", files=files, data={"route": "fast"}, headers={budget.HEADER: "20"}).json()
    assert body["variant"] == "compact" and body["assignment"] == "budget"
    assert all(r["predicted_ms"] == pytest.approx(10.0) and r["budget_ms"] == 20 for r in body["results"])


def test_an_explicit_variant_wins_over_the_budget(client):
    body = classify(client, "1", route="fast", variant="b0").json()
    assert (body["variant"], body["assignment"]) == ("b0", "explicit") and "budget_ms" not in body


def test_a_route_without_the_policy_ignores_a_well_formed_budget(client):
    r = classify(client, "1", route="plain")
    assert r.status_code == 200 and r.json()["variant"] == "b0" and "budget_ms" not in r.json()


@pytest.mark.parametrize("route_name, value, words", [
    ("fast", "fast please", "positive number"), ("plain", "-1", "positive number"),
    ("fast", "1500", "above the limit of route 'fast', 1000 ms"),
])
def test_a_bad_budget_is_a_400_naming_the_header(client, route_name, value, words):
    r = classify(client, value, route=route_name)
    assert r.status_code == 400 and budget.HEADER in r.json()["error"] and words in r.json()["error"], r.text


def test_a_down_variant_is_not_a_candidate(gw, client):
    gw.health.down_variants = lambda: frozenset({"b0"})
    body = classify(client, "1000", route="fast").json()
    assert (body["variant"], body["chosen_because"]) == ("compact", FITS)


def test_service_times_come_from_answers_and_old_ones_are_forgotten(monkeypatch):
    b = budget.Budget(lambda v: 0.9, lambda v: 0, lambda v: None, lambda v: 2)
    a = types.SimpleNamespace(variant="b0", budget=None, route="r")
    clock = [100.0]
    monkeypatch.setattr(budget.time, "monotonic", lambda: clock[0])
    for ms in (30, 10, 20):
        assert b.answered(a, latency_ms=ms, waited=0.005) == {}  # not a budget answer: no fields
    assert b.service_s("b0", clock[0]) == pytest.approx(0.015)  # the median, queue wait taken off
    clock[0] += budget.SAMPLE_MAX_AGE_S + 1
    assert b.service_s("b0", clock[0]) is None  # tried again as if new...
    assert b.service_s("b0", clock[0], probing=True) == pytest.approx(0.015)  # ...by one request at a time


def test_a_budget_ends_a_cascade_after_the_stages_whose_times_add_up_within_it():
    b = budget.Budget(accuracy=lambda v: None, held=lambda v: 0, coalescer=lambda v: None, parallel=lambda v: 1)
    b.service_s = lambda variant, now, probing=False: {"compact": 0.004, "b0": 0.010, "big": 0.100}.get(variant)
    stages = ("compact", "b0", "big")
    assert b.cascade_cut(stages, []) is None  # no header: the whole cascade
    assert b.cascade_cut(stages, ["500"]) is None  # 114 ms: every stage fits
    cut = b.cascade_cut(stages, ["50"])  # 4 + 10 fit, + 100 does not
    assert cut.last == 2 and cut.fields(stages) == {"budget_ms": 50, "cascade_cut_after": "b0",
                                                    "cascade_predicted_ms": 114.0}
    assert b.cascade_cut(stages, ["1"]).last == 1  # the first stage always runs
    assert b.cascade_cut(("compact", "unmeasured"), ["1"]) is None  # a stage not measured yet counts as fitting
    with pytest.raises(ClientError, match=budget.HEADER):
        b.cascade_cut(stages, ["-3"])
