"""Score calibration (training.temperature): the fit on a known case, the ECE, and the worker applying it."""
import math

import numpy as np
import pytest
import torch

from training.temperature import expected_calibration_error, fit_temperature, score_calibration


def known_case(true_t: float, n: int = 20_000, k: int = 10, seed: int = 0):
    """Logits whose labels are drawn from softmax(logits / true_t): the best temperature is true_t."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g) * 4
    labels = torch.multinomial(torch.softmax(logits / true_t, 1), 1, generator=g).squeeze(1)
    return logits, labels


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_the_fit_recovers_the_temperature_that_made_the_labels(true_t):
    logits, labels = known_case(true_t)
    assert fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.05)


def test_an_over_confident_model_gets_a_temperature_above_one_and_a_smaller_ece_on_unseen_data():
    val, test = known_case(2.0, seed=1), known_case(2.0, seed=2)
    out = score_calibration(val, test)
    assert out["temperature"] > 1.5
    assert out["ece_val_after"] < out["ece_val_before"] / 3 and out["ece_test_after"] < out["ece_test_before"] / 3
    # the top-1 never changes: dividing by a positive temperature keeps the order of the logits
    assert torch.equal((test[0] / out["temperature"]).argmax(1), test[0].argmax(1))


def test_ece_of_perfectly_calibrated_and_of_always_wrong_scores():
    probs = torch.tensor([[0.75, 0.25]] * 4, dtype=torch.float64)
    assert expected_calibration_error(probs, torch.tensor([0, 0, 0, 1])) == pytest.approx(0.0)
    assert expected_calibration_error(probs, torch.tensor([1, 1, 1, 1])) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="needs labelled logits"):
        fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


def test_the_worker_divides_the_logits_by_the_manifests_temperature():
    from service.workers import VariantRunner

    z = torch.tensor([[2.0, 0.0, -1.0]])
    runner = VariantRunner.__new__(VariantRunner)
    runner.engines = {1: lambda x: z.expand(len(x), -1)}
    for t in (1.0, 2.0):
        runner.manifest = type("M", (), {"temperature": t})()
        scores = runner._infer(np.zeros((2, 3, 4, 4), np.uint8), 1)
        assert np.allclose(scores, torch.softmax(z / t, 1).numpy()) and scores.shape == (2, 3)
    assert math.isclose(float(scores[0].sum()), 1.0, rel_tol=1e-6)
