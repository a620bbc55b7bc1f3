"""Binary metrics and the decision threshold, computed with scikit-learn.

`evaluate.load(...)` fetches metric code from the Hub at run time, which fails offline and on
locked-down machines; scikit-learn computes the same numbers locally (see README).
PNEUMONIA (label 1) is the positive class; `scores` are P(PNEUMONIA).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

THRESHOLD_RULES = ("youden", "min_sensitivity")


def binary_metrics(labels, scores, threshold: float) -> dict:
    """Accuracy, sensitivity, specificity, precision, F1, ROC-AUC and the confusion matrix."""
    labels = np.asarray(labels, dtype=int)
    scores = np.asarray(scores, dtype=float)
    predicted = (scores >= threshold).astype(int)
    (tn, fp), (fn, tp) = confusion_matrix(labels, predicted, labels=[0, 1])

    def ratio(numerator, denominator):
        return float(numerator / denominator) if denominator else 0.0

    sensitivity = ratio(tp, tp + fn)
    precision = ratio(tp, tp + fp)
    return {
        "n": int(labels.size),
        "threshold": float(threshold),
        "accuracy": ratio(tp + tn, labels.size),
        "sensitivity": sensitivity,
        "specificity": ratio(tn, tn + fp),
        "precision": precision,
        "f1": ratio(2 * precision * sensitivity, precision + sensitivity),
        # AUC is undefined with a single class present (a tiny debug subset): report NaN, not 0.
        "roc_auc": float(roc_auc_score(labels, scores)) if len(set(labels.tolist())) == 2 else float("nan"),
        "confusion_matrix": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
    }


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
