"""Binary metrics and the decision threshold.

The metrics are an `evaluate` module of their own (pneumonia_vit/binary_metrics/), loaded by path so
it works offline; `import evaluate` takes seconds, so it happens on the first `binary_metrics` call,
never at the app's start-up. PNEUMONIA (label 1) is the positive class; `scores` are P(PNEUMONIA).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_curve

THRESHOLD_RULES = ("youden", "min_sensitivity")
METRIC_DIR = Path(__file__).resolve().parent / "binary_metrics"


@functools.cache
def binary_metric():
    """The `evaluate` module, loaded once per process (kept in memory: no cache files to lock)."""
    import evaluate

    return evaluate.load(str(METRIC_DIR), keep_in_memory=True)


def binary_metrics(labels, scores, threshold: float) -> dict:
    """Accuracy, sensitivity, specificity, precision, F1, ROC-AUC and the confusion matrix at `threshold`."""
    return binary_metric().compute(references=np.asarray(labels, dtype=int),
                                   prediction_scores=np.asarray(scores, dtype=float), threshold=threshold)


def choose_threshold(labels, scores, rule: str = "youden", min_sensitivity: float = 0.95) -> float:
    """Picks the P(PNEUMONIA) cut-off on a validation split.

    youden: maximise sensitivity + specificity - 1.
    min_sensitivity: the highest specificity among cut-offs that keep sensitivity >= min_sensitivity.
    The cut-off is placed halfway between the chosen score and the next lower one, so it does not
    sit exactly on a validation image.
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"threshold rule must be one of {THRESHOLD_RULES}, got {rule!r}")
    labels = np.asarray(labels, dtype=int)
    scores = np.asarray(scores, dtype=float)
    if len(set(labels.tolist())) < 2:
        raise ValueError("choosing a threshold needs both classes in the validation split")
    fpr, tpr, cutoffs = roc_curve(labels, scores, drop_intermediate=False)
    if rule == "youden":
        best = int(np.argmax(tpr - fpr))
    else:
        allowed = np.flatnonzero(tpr >= min_sensitivity)
        best = int(allowed[np.argmin(fpr[allowed])])
    if best == 0:  # roc_curve's first cut-off is +inf: nothing predicted positive
        return float(np.nextafter(cutoffs[1], np.inf))
    lower = cutoffs[best + 1] if best + 1 < len(cutoffs) else 0.0
    return float((cutoffs[best] + lower) / 2)
