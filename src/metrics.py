"""Classification metrics. The competition behind the data scores macro-F1, so every
report gives it beside accuracy."""

from __future__ import annotations

import numpy as np


def classification_metrics(labels: np.ndarray, predictions: np.ndarray) -> dict:
    """Accuracy and macro-F1 (both in [0, 1]) with the number of images ``n``.

    Macro-F1 is scikit-learn's, as the competition computes it: the unweighted mean of the
    per-class F1 over the classes that occur in the labels or the predictions.
    """
    # Imported on first use: a script that stops at a bad input never pays its second.
    from sklearn.metrics import f1_score
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    if len(labels) == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan"), "n": 0}
    return {
        "accuracy": float(np.mean(labels == predictions)),
        "macro_f1": float(f1_score(labels, predictions, average="macro", zero_division=0)),
        "n": int(len(labels)),
    }
