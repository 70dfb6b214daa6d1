"""Paired statistics against values worked out by hand."""

import math

import numpy as np
import pytest

from src.metrics import classification_metrics
from src.stats import confusion_scores, gap_closed, mcnemar_exact, mean_and_std, \
    paired_bootstrap


# Quick enough for make test-fast.
pytestmark = pytest.mark.fast


def test_mcnemar_small_table_by_hand():
    # 10 images: both right on 3, only A right on 1, only B right on 5, both wrong on 1.
    a = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], bool)
    b = np.array([1, 1, 1, 0, 1, 1, 1, 1, 1, 0], bool)
    result = mcnemar_exact(a, b)
    assert (result["only_a"], result["only_b"]) == (1, 5)
    # n = 6 discordant, k = min = 1: P[X <= 1] = (1 + 6) / 64; two-sided p = 14/64.
    assert result["p_value"] == pytest.approx(14 / 64)


def test_mcnemar_edge_cases():
    same = np.array([1, 0, 1, 1], bool)
    assert mcnemar_exact(same, same)["p_value"] == 1.0
    # 10 discordant, all for B: p = 2 / 2^10.
    assert mcnemar_exact(np.zeros(10, bool), np.ones(10, bool))["p_value"] == \
        pytest.approx(2 / 1024)
    balanced = mcnemar_exact(np.array([1, 0], bool), np.array([0, 1], bool))
    assert balanced["p_value"] == 1.0


def test_confusion_scores_equal_scikit_learn():
    rng = np.random.default_rng(0)
    for _ in range(20):
        labels = rng.integers(0, 6, 50)
        predictions = np.where(rng.random(50) < 0.6, labels, rng.integers(0, 7, 50))
        ours = confusion_scores(labels, predictions, 7)
        reference = classification_metrics(labels, predictions)
        assert ours["accuracy"] == pytest.approx(reference["accuracy"])
        assert ours["macro_f1"] == pytest.approx(reference["macro_f1"])


def test_bootstrap_known_cases():
    labels = np.arange(40) % 4
    # B is right everywhere, A nowhere: every resample differs by exactly 1.
    wrong = (labels + 1) % 4
    result = paired_bootstrap(labels, wrong, labels, 4, resamples=200, seed=0)
    assert result["accuracy"] == {"difference": 1.0, "low": 1.0, "high": 1.0}
    # Identical predictions: the interval is exactly zero.
    result = paired_bootstrap(labels, wrong, wrong, 4, resamples=200, seed=0)
    assert result["accuracy"]["low"] == result["accuracy"]["high"] == 0.0


def test_bootstrap_interval_matches_the_normal_approximation():
    # 400 images; A right on 200 of them, B right on those plus 40 more: the paired
    # difference is 0.1 with standard error sqrt(p(1-p)/n) for p = 40/400 discordant share,
    # i.e. sqrt(0.1 * 0.9 / 400) = 0.015, so the 95% interval is about 0.1 +- 0.0294.
    labels = np.zeros(400, dtype=int)
    a = np.where(np.arange(400) < 200, 0, 1)
    b = np.where(np.arange(400) < 240, 0, 1)
    result = paired_bootstrap(labels, a, b, 2, resamples=4000, seed=1)["accuracy"]
    assert result["difference"] == pytest.approx(0.1)
    half_width = 1.96 * math.sqrt(0.1 * 0.9 / 400)
    assert result["low"] == pytest.approx(0.1 - half_width, abs=0.006)
    assert result["high"] == pytest.approx(0.1 + half_width, abs=0.006)
    again = paired_bootstrap(labels, a, b, 2, resamples=4000, seed=1)["accuracy"]
    assert again == result     # fixed seed, same interval


def test_gap_closed_and_mean_std():
    assert gap_closed(0.9766, 0.9015, 0.9173) == pytest.approx(0.158 / 0.751, rel=1e-3)
    assert gap_closed(0.5, 0.6, 0.7) is None
    mean, std = mean_and_std([1.0, 2.0, 3.0])
    assert (mean, std) == (2.0, 1.0)
    assert mean_and_std([0.7]) == (0.7, 0.0)
