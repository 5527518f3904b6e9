"""The statistics of an A/B test (service.experiments.stats): intervals and simulated experiments.

The simulations are numpy-vectorised over runs: each run is a stream of feedback in batches of 100
labelled answers split at random between control and variant, and the decision is looked at after
every batch (60 looks, up to about 3,000 labelled answers per arm).
"""
import json
import math

import numpy as np
import pytest

from service.experiments import stats
from service.experiments.stats import Counts, decide, minimum_detectable_effect, predicted_sample_size, wilson

RUNS, LOOKS, BATCH = 2000, 60, 100


def simulate(p_control, p_variant, seed, runs=RUNS, looks=LOOKS, batch=BATCH):
    """Cumulative (control labelled, control correct, variant labelled, variant correct), shape (runs, looks)."""
    rng = np.random.default_rng(seed)
    n_c = rng.binomial(batch, 0.5, size=(runs, looks))
    n_v = batch - n_c
    return (n_c.cumsum(1), rng.binomial(n_c, p_control).cumsum(1),
            n_v.cumsum(1), rng.binomial(n_v, p_variant).cumsum(1))


def statuses_at_every_look(streams, **kw):
    n_c, s_c, n_v, s_v = streams
    seq = stats.sequential(n_c, s_c, n_v, s_v)
    return stats.statuses(seq.low, seq.high, n_c, n_v, **kw)


def first_conclusion(status, streams):
    """Per run: the first status other than collecting (or collecting), and the smaller arm's size then."""
    concluded = status != stats.COLLECTING
    first = concluded.argmax(axis=1)
    rows = np.arange(status.shape[0])
    n_at = np.minimum(streams[0], streams[2])[rows, first]
    return np.where(concluded.any(axis=1), status[rows, first], stats.COLLECTING), n_at


# wilson

@pytest.mark.parametrize("successes, n, low, high", [
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion", table I, method 3
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)])
def test_wilson_matches_newcombes_published_intervals(successes, n, low, high):
    got = wilson(successes, n)
    assert got == pytest.approx((low, high), abs=6e-5)


def test_wilson_stays_in_the_unit_interval_and_widens_with_confidence():
    assert wilson(0, 0) == (0.0, 1.0)
    assert wilson(50, 50)[1] == 1.0 and wilson(50, 50)[0] > 0.9
    lo95, hi95 = wilson(880, 1000)
    lo99, hi99 = wilson(880, 1000, confidence=0.99)
    assert lo99 < lo95 < 0.88 < hi95 < hi99


def test_counts_refuse_impossible_values():
    with pytest.raises(ValueError):
        Counts(10, 11)
    with pytest.raises(ValueError):
        wilson(-1, 10)
    with pytest.raises(ValueError):
        wilson(5, 10, confidence=1.0)


# A/A: equal accuracies, looked at after every batch

def test_a_a_experiments_peeked_after_every_batch_say_better_or_worse_at_most_6_5_percent_of_the_time():
    status = statuses_at_every_look(simulate(0.88, 0.88, seed=1))
    false_positive = np.isin(status, [stats.BETTER, stats.WORSE]).any(axis=1).mean()
    # Ville's bound is 5%; the mSPRT is conservative in practice (about 1% here)
    assert false_positive <= 0.065, false_positive


def test_a_naive_z_test_peeked_after_every_batch_is_far_above_5_percent_on_the_same_streams():
    n_c, s_c, n_v, s_v = streams = simulate(0.88, 0.88, seed=1)
    pooled = (s_c + s_v) / (n_c + n_v)
    z = (s_v / n_v - s_c / n_c) / np.sqrt(pooled * (1 - pooled) * (1 / n_c + 1 / n_v))
    naive_peeked = (np.abs(z) > 1.96).any(axis=1).mean()
    naive_once = (np.abs(z[:, -1]) > 1.96).mean()
    msprt = np.isin(statuses_at_every_look(streams), [stats.BETTER, stats.WORSE]).any(axis=1).mean()
    # looked at once the z-test is fine; looked at 60 times, it finds a difference in about a third
    assert 0.03 < naive_once < 0.07, naive_once
    assert naive_peeked > 0.2 and naive_peeked > 5 * msprt, (naive_peeked, msprt)


def test_a_a_experiments_end_in_no_difference_once_the_interval_fits_in_the_margin():
    status = statuses_at_every_look(simulate(0.88, 0.88, seed=2), margin=0.03)
    # at 3,000 labels per arm the interval's half-width is about 0.026: within +-3 points in many runs
    assert (status[:, -1] == stats.NO_DIFFERENCE).mean() > 0.3
    assert (status[:, :5] == stats.NO_DIFFERENCE).sum() == 0  # not at a few hundred labels


def test_no_difference_is_rarely_said_when_the_true_difference_exceeds_the_margin():
    status = statuses_at_every_look(simulate(0.88, 0.845, seed=3), margin=0.03)
    assert (status == stats.NO_DIFFERENCE).any(axis=1).mean() <= 0.05


# A/B: a known difference

def test_predicted_sample_size_for_90_against_85_percent():
    # L(0) >= 1/alpha with d = 0.05, V = (0.85 * 0.15 + 0.90 * 0.10) / n, tau = 0.02, alpha = 0.05
    assert predicted_sample_size(0.85, 0.90) == 957
    assert predicted_sample_size(0.90, 0.85) == 957
    assert predicted_sample_size(0.88, 0.86) > predicted_sample_size(0.88, 0.83) > predicted_sample_size(0.88, 0.70)
    with pytest.raises(ValueError):
        predicted_sample_size(0.88, 0.88)


@pytest.mark.parametrize("p_control, p_variant, right", [(0.85, 0.90, stats.BETTER), (0.90, 0.85, stats.WORSE)])
def test_a_b_experiments_decide_on_the_right_side_near_the_predicted_sample_size(p_control, p_variant, right):
    streams = simulate(p_control, p_variant, seed=4)
    first, n_at = first_conclusion(statuses_at_every_look(streams), streams)
    assert (first == right).mean() >= 0.99
    wrong = stats.WORSE if right == stats.BETTER else stats.BETTER
    assert (first == wrong).sum() == 0
    # the median run decides within 20% of the prediction (957 per arm); runs scatter around it
    predicted = predicted_sample_size(p_control, p_variant)
    median = np.median(n_at[first == right])
    assert 0.8 * predicted < median < 1.2 * predicted, (median, predicted)


# minimum detectable effect

@pytest.mark.parametrize("n", [500, 2000])
def test_a_difference_of_the_mde_is_declared_with_the_stated_power_on_either_side(n):
    mde = minimum_detectable_effect(n, n, 0.85, power=0.8)
    rng = np.random.default_rng(n)
    for sign in (1, -1):
        s_c = rng.binomial(n, 0.85, 20000)
        s_v = rng.binomial(n, 0.85 + sign * mde, 20000)
        declared = (stats.sequential(n, s_c, n, s_v).p_value <= 0.05).mean()
        assert declared >= 0.77, (sign, declared)
    # the harder side (towards 1/2, more variance) is where the power is just reached
    assert declared < 0.84


def test_the_mde_shrinks_like_one_over_the_square_root_of_the_sample_size():
    mde = minimum_detectable_effect(np.array([1000, 4000, 16000]), np.array([1000, 4000, 16000]), 0.88)
    assert mde[0] > mde[1] > mde[2]
    assert 1.6 < mde[0] / mde[1] < 2.4 and 1.6 < mde[1] / mde[2] < 2.4
    assert math.isinf(minimum_detectable_effect(0, 100, 0.88))


# decide

def test_decide_collects_until_both_arms_have_enough_labels():
    d = decide(Counts(60, 30), Counts(60, 60))
    assert d.status == stats.COLLECTING and d.difference == pytest.approx(0.5)
    assert decide((0, 0), (0, 0)).status == stats.COLLECTING


def test_decide_agrees_with_the_vectorised_rule_and_reports_a_consistent_p_value():
    n_c, s_c, n_v, s_v = (x[:50, -1] for x in simulate(0.85, 0.88, seed=5, runs=50))
    seq = stats.sequential(n_c, s_c, n_v, s_v)
    expected = stats.statuses(seq.low, seq.high, n_c, n_v)
    for i in range(50):
        d = decide((int(n_c[i]), int(s_c[i])), (int(n_v[i]), int(s_v[i])))
        assert d.status == expected[i]
        assert (d.low, d.high, d.p_value) == pytest.approx((seq.low[i], seq.high[i], seq.p_value[i]))
        # the interval excludes 0 exactly when the p-value is at most alpha
        assert (d.low > 0 or d.high < 0) == (d.p_value <= 0.05)


def test_a_decision_once_reached_stays_reached_when_earlier_looks_are_passed():
    n_c, s_c, n_v, s_v = simulate(0.85, 0.90, seed=6, runs=1)
    earlier, seen = None, []
    for t in range(LOOKS):
        earlier = decide((int(n_c[0, t]), int(s_c[0, t])), (int(n_v[0, t]), int(s_v[0, t])), earlier=earlier)
        seen.append(earlier.status)
    first = seen.index(stats.BETTER)
    assert set(seen[first:]) == {stats.BETTER}
    assert seen[:first] == [stats.COLLECTING] * first
    # each look alone wavers on this stream: the interval's edge crosses 0 again after the first crossing
    alone = [decide((int(n_c[0, t]), int(s_c[0, t])), (int(n_v[0, t]), int(s_v[0, t]))).status for t in range(LOOKS)]
    assert alone.index(stats.BETTER) == first and set(alone[first:]) != {stats.BETTER}


def test_a_decision_is_json_ready():
    d = decide((0, 0), (0, 0))
    body = json.loads(json.dumps(d.as_dict()))
    assert body["difference"] is None and body["mde"] is None and body["confidence"] == 0.95
    d = decide((3000, 2550), (3000, 2700))
    assert d.as_dict()["status"] == "better" and d.as_dict()["low"] > 0
