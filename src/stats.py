"""Paired statistics for two models tested on the same images.

One run each on ~1,600 test images cannot support a claim of one or two points: the
standard error of an accuracy near 90% there is about 0.75 points. These functions say how
sure a difference is: a paired bootstrap interval (accuracy and macro-F1) and an exact
McNemar test on the images where exactly one of the two models is right.
"""

from __future__ import annotations

import math

import numpy as np



def mcnemar_exact(a_correct: np.ndarray, b_correct: np.ndarray) -> dict:
    """Exact (binomial) two-sided McNemar test.

    ``only_a``: images A gets right and B wrong; ``only_b``: the reverse. Under the null
    hypothesis (equal accuracy) each discordant image is a fair coin, so
    ``p = min(1, 2 * P[Binomial(n, 1/2) <= min(only_a, only_b)])``, n = only_a + only_b.
    """
    a_correct, b_correct = np.asarray(a_correct, bool), np.asarray(b_correct, bool)
    only_a = int(np.sum(a_correct & ~b_correct))
    only_b = int(np.sum(~a_correct & b_correct))
    discordant = only_a + only_b
    if discordant == 0:
        return {"only_a": 0, "only_b": 0, "p_value": 1.0}
    tail = sum(math.comb(discordant, k) for k in range(min(only_a, only_b) + 1))
    return {"only_a": only_a, "only_b": only_b,
            "p_value": min(1.0, 2 * tail / 2 ** discordant)}


def confusion_scores(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> dict:
    """Accuracy and macro-F1 from a confusion matrix: the same definitions as
    ``metrics.classification_metrics`` (F1 averaged over the classes that occur in the
    labels or the predictions), fast enough for thousands of bootstrap resamples."""
    counts = np.bincount(labels * num_classes + predictions, minlength=num_classes ** 2)
    confusion = counts.reshape(num_classes, num_classes)
    true_positives = np.diag(confusion)
    predicted, actual = confusion.sum(0), confusion.sum(1)
    present = (predicted + actual) > 0
    denominator = predicted + actual          # = 2 TP + FP + FN
    f1 = np.divide(2 * true_positives, denominator, out=np.zeros(num_classes),
                   where=denominator > 0)
    return {"accuracy": true_positives.sum() / len(labels), "macro_f1": f1[present].mean()}


def paired_bootstrap(labels: np.ndarray, predictions_a: np.ndarray, predictions_b: np.ndarray,
                     num_classes: int, resamples: int = 10_000, seed: int = 0,
                     level: float = 0.95) -> dict:
    """Percentile bootstrap interval of ``metric(B) - metric(A)`` for accuracy and macro-F1,
    resampling test images (one resample serves both models, since they are paired).
    Labels and predictions are class ids in ``range(num_classes)``."""
    labels = np.asarray(labels, dtype=np.int64)
    predictions_a = np.asarray(predictions_a, dtype=np.int64)
    predictions_b = np.asarray(predictions_b, dtype=np.int64)
    rng = np.random.default_rng(seed)
    n = len(labels)
    differences = {"accuracy": np.empty(resamples), "macro_f1": np.empty(resamples)}
    for r in range(resamples):
        sample = rng.integers(0, n, n)
        a = confusion_scores(labels[sample], predictions_a[sample], num_classes)
        b = confusion_scores(labels[sample], predictions_b[sample], num_classes)
        for key in differences:
            differences[key][r] = b[key] - a[key]
    full_a = confusion_scores(labels, predictions_a, num_classes)
    full_b = confusion_scores(labels, predictions_b, num_classes)
    tail = (1 - level) / 2 * 100
    return {key: {"difference": float(full_b[key] - full_a[key]),
                  "low": float(np.percentile(values, tail)),
                  "high": float(np.percentile(values, 100 - tail))}
            for key, values in differences.items()}


def gap_closed(teacher: float, baseline: float, student: float) -> float | None:
    """Fraction of the teacher-baseline gap the distilled student closes:
    ``(student - baseline) / (teacher - baseline)``; None when the teacher is not better."""
    gap = teacher - baseline
    return (student - baseline) / gap if gap > 0 else None


def mean_and_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); std is 0 for a single value."""
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0
