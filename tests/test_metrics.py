"""pneumonia_vit.training.evaluation on cases small enough to work out by hand (PNEUMONIA = 1 is positive)."""

from __future__ import annotations

import math

import pytest

from pneumonia_vit.training.evaluation import THRESHOLD_RULES, binary_metrics, choose_threshold


def test_binary_metrics_hand_computed():
    labels = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    scores = [0.1, 0.4, 0.6, 0.2, 0.9, 0.8, 0.3, 0.7, 0.55, 0.65]
    # threshold 0.5 -> predicted  0, 0, 1, 0, 1, 1, 0, 1, 1, 1
    #
    #                 predicted NORMAL  predicted PNEUMONIA
    # true NORMAL          TN = 3            FP = 1      (0.1 0.4 0.2 | 0.6)
    # true PNEUMONIA       FN = 1            TP = 5      (0.3 | 0.9 0.8 0.7 0.55 0.65)
    #
    # accuracy 8/10, sensitivity 5/6, specificity 3/4, precision 5/(5+1), F1 = 5/6.
    # AUC: of the 6 x 4 = 24 (positive, negative) pairs the positive scores higher in
    # 0.9: 4, 0.8: 4, 0.3: 2 (0.1, 0.2), 0.7: 4, 0.55: 3 (0.1, 0.2, 0.4), 0.65: 4 -> 21/24.
    metrics = binary_metrics(labels, scores, threshold=0.5)
    assert metrics["confusion_matrix"] == {"tn": 3, "fp": 1, "fn": 1, "tp": 5}
    assert metrics["n"] == 10
    assert metrics["threshold"] == 0.5
    assert metrics["accuracy"] == pytest.approx(0.8)
    assert metrics["sensitivity"] == pytest.approx(5 / 6)
    assert metrics["specificity"] == pytest.approx(3 / 4)
    assert metrics["precision"] == pytest.approx(5 / 6)
    assert metrics["f1"] == pytest.approx(5 / 6)
    assert metrics["roc_auc"] == pytest.approx(21 / 24)
    # Plain Python types: the dict goes straight into json.dumps.
    assert all(type(value) in (int, float, dict) for value in metrics.values())


def test_score_equal_to_threshold_counts_as_pneumonia():
    # P(PNEUMONIA) >= threshold predicts PNEUMONIA: TN 1 (0.2), FP 1 (0.5), FN 0, TP 1 (0.5).
    metrics = binary_metrics([0, 0, 1], [0.2, 0.5, 0.5], threshold=0.5)
    assert metrics["confusion_matrix"] == {"tn": 1, "fp": 1, "fn": 0, "tp": 1}


def test_perfect_and_inverted_scores():
    labels = [0, 0, 1, 1]
    perfect = binary_metrics(labels, [0.1, 0.2, 0.8, 0.9], threshold=0.5)
    assert perfect["confusion_matrix"] == {"tn": 2, "fp": 0, "fn": 0, "tp": 2}
    for key in ("accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc"):
        assert perfect[key] == 1.0, key

    # Every image on the wrong side: TN 0, FP 2, FN 2, TP 0. Precision 0/2, F1 0 (0/0 reported as 0).
    inverted = binary_metrics(labels, [0.9, 0.8, 0.2, 0.1], threshold=0.5)
    assert inverted["confusion_matrix"] == {"tn": 0, "fp": 2, "fn": 2, "tp": 0}
    for key in ("accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc"):
        assert inverted[key] == 0.0, key


def test_auc_is_nan_with_one_class():
    # A debug subset with only PNEUMONIA images: AUC undefined (NaN, not 0); the rest still counts.
    metrics = binary_metrics([1, 1, 1], [0.2, 0.6, 0.9], threshold=0.5)
    assert math.isnan(metrics["roc_auc"])
    assert metrics["confusion_matrix"] == {"tn": 0, "fp": 0, "fn": 1, "tp": 2}
    assert metrics["sensitivity"] == pytest.approx(2 / 3)


# Validation scores for the threshold tests:
#   NORMAL    0.1 0.3 0.6
#   PNEUMONIA 0.2 0.7 0.9
# cut-off (predict PNEUMONIA at >=)   sensitivity  1 - specificity  Youden J
#   0.9                                1/3          0                1/3
#   0.7                                2/3          0                2/3   <- maximum
#   0.6                                2/3          1/3              1/3
#   0.3                                2/3          2/3              0
#   0.2                                1            2/3              1/3   <- first with sensitivity 1
#   0.1                                1            1                0
LABELS6 = [0, 0, 0, 1, 1, 1]
SCORES6 = [0.1, 0.3, 0.6, 0.2, 0.7, 0.9]


def test_youden_threshold_sits_halfway_to_the_next_lower_score():
    threshold = choose_threshold(LABELS6, SCORES6, "youden")
    # Best cut-off 0.7, placed halfway down to the next lower score, 0.6.
    assert threshold == pytest.approx(0.65)
    metrics = binary_metrics(LABELS6, SCORES6, threshold)
    assert metrics["confusion_matrix"] == {"tn": 3, "fp": 0, "fn": 1, "tp": 2}


def test_min_sensitivity_threshold():
    # Sensitivity >= 0.95 first reached at cut-off 0.2 (specificity 1/3); halfway down to 0.1.
    assert choose_threshold(LABELS6, SCORES6, "min_sensitivity", min_sensitivity=0.95) == pytest.approx(0.15)
    # Sensitivity >= 0.6: cut-offs 0.7 and below qualify; the best specificity (1) is at 0.7.
    assert choose_threshold(LABELS6, SCORES6, "min_sensitivity", min_sensitivity=0.6) == pytest.approx(0.65)
    metrics = binary_metrics(LABELS6, SCORES6, choose_threshold(LABELS6, SCORES6, "min_sensitivity"))
    assert metrics["confusion_matrix"] == {"tn": 1, "fp": 2, "fn": 0, "tp": 3}


def test_threshold_below_the_lowest_score_goes_halfway_to_zero():
    # Sensitivity 1 needs the lowest score (0.2, a PNEUMONIA image) above the cut-off: 0.2 / 2.
    assert choose_threshold([1, 0, 1], [0.2, 0.5, 0.8], "min_sensitivity", min_sensitivity=1.0) == pytest.approx(0.1)


def test_inverted_scores_threshold_predicts_nothing_positive():
    # Youden J <= 0 everywhere: the best is "nothing positive", a cut-off just above the top score.
    threshold = choose_threshold([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1], "youden")
    assert 0.9 < threshold < 0.9 + 1e-9


def test_threshold_is_strictly_between_scores_on_real_sized_input():
    import numpy as np

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    scores = np.clip(rng.normal(0.35 + 0.3 * labels, 0.15), 0, 1)
    for rule in THRESHOLD_RULES:
        threshold = choose_threshold(labels, scores, rule)
        assert 0 < threshold < 1
        assert not np.any(scores == threshold), "the cut-off must not sit on a validation score"


def test_invalid_rule_and_single_class_raise():
    with pytest.raises(ValueError, match="threshold rule must be one of"):
        choose_threshold(LABELS6, SCORES6, "f1")
    with pytest.raises(ValueError, match="both classes"):
        choose_threshold([1, 1, 1], [0.2, 0.5, 0.9], "youden")


def test_evaluate_module_loaded_by_path_matches_sklearn_on_real_scores(data_root, served_model_dir):
    """The `evaluate` module (what evaluation, evaluate_vit.py and training report) against scikit-learn
    called directly, on the served model's scores for real test X-rays at its stored threshold."""
    import evaluate
    import numpy as np
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score, recall_score, roc_auc_score

    from pneumonia_vit.images import LABELS, load_xray
    from pneumonia_vit.inference.classifier import Classifier
    from pneumonia_vit.training.evaluation import METRIC_DIR

    classifier = Classifier.load(str(served_model_dir), fast=False)
    labels, images = [], []
    for label, name in enumerate(LABELS):
        for path in sorted((data_root / "chest_xray_224" / "test" / name).iterdir())[:40]:
            labels.append(label)
            images.append(load_xray(path))
    scores = classifier.pneumonia_probability(images).astype(float)
    labels = np.array(labels)
    predicted = (scores >= classifier.threshold).astype(int)
    assert 0 < predicted.sum() < len(predicted), "both decisions should occur for the comparison to mean much"

    metrics = evaluate.load(str(METRIC_DIR)).compute(references=labels, prediction_scores=scores,
                                                      threshold=classifier.threshold)
    (tn, fp), (fn, tp) = confusion_matrix(labels, predicted)
    assert metrics["confusion_matrix"] == {"tn": tn, "fp": fp, "fn": fn, "tp": tp}
    assert metrics["n"] == len(labels)
    assert metrics["threshold"] == classifier.threshold
    expected = {
        "accuracy": accuracy_score(labels, predicted),
        "sensitivity": recall_score(labels, predicted),
        "specificity": recall_score(labels, predicted, pos_label=0),
        "precision": precision_score(labels, predicted),
        "f1": f1_score(labels, predicted),
        "roc_auc": roc_auc_score(labels, scores),
    }
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key
