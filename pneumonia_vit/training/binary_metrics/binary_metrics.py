"""Binary-classification metrics at a decision threshold, as an `evaluate` module.

Loaded by path, offline: `evaluate.load("pneumonia_vit/training/binary_metrics")`; the folder is also a Hub
metric as it stands (this file and README.md), so it imports nothing from the project.
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import confusion_matrix, roc_auc_score

_DESCRIPTION = """Accuracy, sensitivity (recall), specificity, precision, F1, ROC-AUC and the confusion matrix
of a binary classifier whose scores are P(positive), with `score >= threshold` predicting positive."""

_KWARGS_DESCRIPTION = """
Args:
    references (`list` of `int`): true labels, 1 for the positive class, 0 for the negative one.
    prediction_scores (`list` of `float`): the predicted probability of the positive class.
    threshold (`float`): scores at or above it predict the positive class. Defaults to 0.5.
Returns:
    n, threshold, accuracy, sensitivity, specificity, precision, f1, roc_auc (NaN with one class
    present: undefined, not 0) and confusion_matrix ({"tn", "fp", "fn", "tp"}), as plain Python numbers.
    A ratio with a zero denominator (precision with nothing predicted positive) is 0.
Examples:
    >>> metric = evaluate.load("pneumonia_vit/training/binary_metrics")
    >>> metric.compute(references=[0, 1, 1], prediction_scores=[0.2, 0.4, 0.9], threshold=0.5)["sensitivity"]
    0.5
"""


class BinaryMetrics(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            # float64: float32 scores would move values that sit next to the threshold across it.
            features=datasets.Features({"references": datasets.Value("int32"),
                                        "prediction_scores": datasets.Value("float64")}),
        )

    def _compute(self, references, prediction_scores, threshold: float = 0.5):
        labels = np.asarray(references, dtype=int)
        scores = np.asarray(prediction_scores, dtype=float)
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
            "roc_auc": float(roc_auc_score(labels, scores)) if len(set(labels.tolist())) == 2 else float("nan"),
            "confusion_matrix": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
        }
