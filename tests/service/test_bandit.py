"""The bandit split (service.experiments.bandit): Thompson sampling with a floor and a latency cost."""
import numpy as np
import pytest

from service.experiments.bandit import Posterior, shares

ACCURACY = {"mec": 0.90, "b0": 0.88, "compact": 0.85}
BATCHES, BATCH = 60, 250  # the split is recomputed after every 250 answers, 15,000 in all


def posteriors(counts, p50=None):
    return {name: Posterior.from_counts(c, None if p50 is None else p50[name]) for name, c in counts.items()}


def run_stream(seed, floor=0.05, policy="bandit"):
    """One simulated stream; returns its pseudo-regret (expected correct answers lost against always
    sending everything to the best variant) and the split after every recomputation."""
    rng = np.random.default_rng(seed)
    names = list(ACCURACY)
    p = np.array([ACCURACY[n] for n in names])
    labelled, correct = np.zeros(3, int), np.zeros(3, int)
    regret, splits = 0.0, []
    for _ in range(BATCHES):
        if policy == "bandit":
            split = shares(posteriors({n: (labelled[i], correct[i]) for i, n in enumerate(names)}), floor, rng)
            w = np.array([split[n] for n in names])
        else:
            w = np.full(3, 1 / 3)
        splits.append(w)
        regret += BATCH * float((w * (p.max() - p)).sum())
        sent = rng.multinomial(BATCH, w)
        labelled += sent
        correct += rng.binomial(sent, p)
    return regret, np.array(splits)


@pytest.fixture(scope="module")
def bandit_streams():
    return [run_stream(seed) for seed in range(10)]


def test_every_variant_keeps_its_floor_even_when_one_is_certainly_best():
    split = shares(posteriors({"a": (10_000, 10_000), "b": (10_000, 0), "c": (10_000, 5000)}), floor=0.05, rng=0)
    assert split == pytest.approx({"a": 0.90, "b": 0.05, "c": 0.05})
    assert sum(split.values()) == pytest.approx(1.0)


def test_with_no_feedback_the_split_is_even():
    split = shares(posteriors({n: (0, 0) for n in ACCURACY}), rng=1)
    assert all(abs(s - 1 / 3) < 0.03 for s in split.values()), split


def test_the_same_seed_gives_the_same_split():
    post = posteriors({"a": (200, 180), "b": (200, 176)})
    assert shares(post, rng=7) == shares(post, rng=7)
    assert shares(post, rng=np.random.default_rng(7)) == shares(post, rng=7)


def test_on_a_simulated_stream_the_regret_is_below_uniform_splitting_and_the_floor_holds(bandit_streams):
    bandit = bandit_streams
    uniform, _ = run_stream(0, policy="uniform")
    # uniform loses (0 + 2 + 5) / 3 points per answer: 350 answers in 15,000
    assert uniform == pytest.approx(350.0)
    regrets = np.array([r for r, _ in bandit])
    assert (regrets < uniform).all() and regrets.mean() < 0.5 * uniform, regrets
    for _, splits in bandit:
        assert splits.min() >= 0.05 - 1e-12
        assert np.allclose(splits.sum(axis=1), 1.0)


def test_the_best_variants_share_grows(bandit_streams):
    splits = np.array([s for _, s in bandit_streams])  # (seed, recomputation, variant)
    best = splits[:, :, 0].mean(axis=0)
    assert best[0] == pytest.approx(1 / 3, abs=0.05)
    assert best[-1] > 0.7 and best[-1] > best[BATCHES // 2] > best[0], best
    assert (splits[:, -1, 0] > splits[:, -1, 1:].max(axis=1)).mean() >= 0.9


def test_a_latency_cost_moves_traffic_to_the_faster_of_two_equally_accurate_variants():
    counts = {"fast": (2000, 1800), "slow": (2000, 1800)}
    p50 = {"fast": 10.0, "slow": 30.0}
    even = shares(posteriors(counts, p50), rng=3)
    assert abs(even["fast"] - 0.5) < 0.05  # no cost: a coin flip
    costed = shares(posteriors(counts, p50), rng=3, cost_per_ms=0.001)  # 20 ms = 2 points of accuracy
    assert costed["fast"] > 0.9 and costed["slow"] >= 0.05


def test_a_latency_cost_does_not_outweigh_a_large_accuracy_gap():
    counts = {"fast": (2000, 1600), "slow": (2000, 1800)}  # 80% against 90%
    split = shares(posteriors(counts, {"fast": 10.0, "slow": 30.0}), rng=3, cost_per_ms=0.001)
    assert split["slow"] > 0.9


def test_bad_arguments_are_refused():
    post = posteriors({"a": (10, 9), "b": (10, 8), "c": (10, 7)})
    with pytest.raises(ValueError):
        shares(post, floor=0.4)  # three floors of 40% exceed the traffic
    with pytest.raises(ValueError):
        shares(post, cost_per_ms=0.001)  # no p50 to charge
    with pytest.raises(ValueError):
        shares({})
    with pytest.raises(ValueError):
        Posterior(0, 1)
    with pytest.raises(ValueError):
        Posterior.from_counts((5, 6))
