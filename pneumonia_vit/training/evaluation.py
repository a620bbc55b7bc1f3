"""Scoring a split and judging it: the binary metrics, the decision threshold (ThresholdPolicy, operating_point)
and the report (metrics JSON, confusion-matrix and ROC plots). PNEUMONIA (label 1) is the positive class; `scores`
are P(PNEUMONIA). Scores come from `Trainer.predict`, which counts each image once under `accelerate launch`.
"""

from __future__ import annotations

import functools
import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from sklearn.metrics import roc_curve

from ..images import LABELS
from ..preprocess import PixelSpec
from .data import BatchTransform, check_crop, collate

THRESHOLD_RULES = ("youden", "min_sensitivity")
METRIC_DIR = Path(__file__).resolve().parent / "binary_metrics"


def labels_and_scores(prediction) -> tuple[np.ndarray, np.ndarray]:
    """Labels and P(PNEUMONIA) from a Trainer prediction (its `label_ids` and logits)."""
    scores = torch.from_numpy(prediction.predictions).float().softmax(dim=-1)[:, 1].numpy()
    return prediction.label_ids.astype(int), scores


def predict_scores(trainer, dataset) -> tuple[np.ndarray, np.ndarray]:
    """Labels and P(PNEUMONIA) for every image of `dataset`, in dataset order."""
    return labels_and_scores(trainer.predict(dataset))


@contextmanager
def scoring_trainer(model, batch_size: int) -> Iterator:
    """A Trainer that only scores (`predict_scores`), in fp32, on the GPU where there is one."""
    from transformers import Trainer, TrainingArguments

    with tempfile.TemporaryDirectory() as scratch:
        yield Trainer(
            model=model, data_collator=collate,
            args=TrainingArguments(output_dir=scratch, per_device_eval_batch_size=batch_size, report_to="none",
                                   use_cpu=not torch.cuda.is_available(), remove_unused_columns=False,
                                   label_names=["labels"]),  # as in train_vit.py
            # DeiT's two-head model returns no loss of its own; the loss is not reported, only the scores.
            compute_loss_func=lambda outputs, labels, num_items_in_batch=None: torch.nn.functional.cross_entropy(
                outputs.logits, labels),
        )


def write_report(labels, scores, threshold: float, output_dir: str | Path, split: str) -> dict:
    """Writes {split}_metrics.json, {split}_confusion_matrix.png and {split}_roc.png; returns the metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics = binary_metrics(labels, scores, threshold)
    (output_dir / f"{split}_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    matrix = metrics["confusion_matrix"]
    counts = np.array([[matrix["tn"], matrix["fp"]], [matrix["fn"], matrix["tp"]]])
    matrix_figure, axes = plt.subplots(figsize=(4.4, 3.8))
    ConfusionMatrixDisplay(counts, display_labels=LABELS).plot(ax=axes, cmap="Blues", colorbar=False)
    axes.set_title(f"{split}: threshold {threshold:.3f}")

    roc_figure, axes = plt.subplots(figsize=(4, 4))
    if len(set(np.asarray(labels).tolist())) == 2:
        fpr, tpr, _ = roc_curve(labels, scores)
        axes.plot(fpr, tpr, label=f"AUC {metrics['roc_auc']:.3f}")
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey")
    axes.scatter([1 - metrics["specificity"]], [metrics["sensitivity"]], color="red", zorder=3, label=f"threshold {threshold:.3f}")
    axes.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC, {split} split")
    axes.legend(loc="lower right")
    for name, figure in (("confusion_matrix", matrix_figure), ("roc", roc_figure)):
        figure.tight_layout()
        figure.savefig(output_dir / f"{split}_{name}.png", dpi=120)
        plt.close(figure)
    return metrics


@functools.cache
def binary_metric():
    """The `evaluate` module beside this file, loaded by path (offline) once per process, on first use (`import
    evaluate` takes seconds), kept in memory: no cache files to lock."""
    import evaluate

    return evaluate.load(str(METRIC_DIR), keep_in_memory=True)


def binary_metrics(labels, scores, threshold: float) -> dict:
    """Accuracy, sensitivity, specificity, precision, F1, ROC-AUC and the confusion matrix at `threshold`."""
    return binary_metric().compute(references=np.asarray(labels, dtype=int),
                                   prediction_scores=np.asarray(scores, dtype=float), threshold=threshold)


def check_rule(rule: str) -> None:
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"threshold rule must be one of {THRESHOLD_RULES}, got {rule!r}")


def choose_threshold(labels, scores, rule: str = "youden", min_sensitivity: float = 0.95) -> float:
    """Picks the P(PNEUMONIA) cut-off on a validation split: youden maximises sensitivity + specificity - 1,
    min_sensitivity takes the highest specificity that keeps sensitivity >= min_sensitivity. The cut-off sits
    halfway between the chosen score and the next lower one, not on a validation image."""
    check_rule(rule)
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


@dataclass
class ThresholdPolicy:
    """How the validation split picks the decision threshold, the P(PNEUMONIA) cut-off stored in the model config."""

    threshold_rule: str = field(default="youden", metadata={"help": "How the cut-off is picked (choose_threshold).", "choices": THRESHOLD_RULES})
    min_sensitivity: float = field(default=0.95, metadata={"help": "For --threshold_rule min_sensitivity."})
    threshold_centre_crop: float = field(default=1.0, metadata={"help": (
        "Choose the cut-off on the validation films pooled with their middle, this fraction of their width and height "
        "(e.g. 0.85; 1: whole films only): a tighter framing, as other hospitals' films have, raises normal children's scores.")})

    def __post_init__(self):  # at parse time: a bad setting is refused before training, not after it
        check_rule(self.threshold_rule)
        check_crop(self.threshold_centre_crop)

    def describe(self) -> str:
        rule = f"min_sensitivity>={self.min_sensitivity}" if self.threshold_rule == "min_sensitivity" else "youden"
        return rule + (f" on whole + {self.threshold_centre_crop:g} centre-cropped films" if self.threshold_centre_crop != 1 else "")

    def films(self) -> str:
        crop = self.threshold_centre_crop
        return "validation" if crop == 1 else f"validation films whole and centre-cropped to {crop:.0%}, pooled"


class OperatingPoint(NamedTuple):
    threshold: float
    films: tuple[np.ndarray, np.ndarray]  # labels and P(PNEUMONIA) of what the threshold was picked on (policy.films)
    whole: tuple[np.ndarray, np.ndarray]  # those of the validation films whole


def operating_point(trainer, validation, spec: PixelSpec, policy: ThresholdPolicy) -> OperatingPoint:
    """The threshold `policy` picks on the `validation` films as `trainer` scores them: whole, pooled with their
    middle where the policy says."""
    whole = predict_scores(trainer, validation)
    films = whole
    if policy.threshold_centre_crop != 1:
        crops = predict_scores(trainer, validation.with_transform(BatchTransform(spec, crop=policy.threshold_centre_crop)))
        films = tuple(np.concatenate(pair) for pair in zip(whole, crops))
    return OperatingPoint(choose_threshold(*films, policy.threshold_rule, policy.min_sensitivity), films, whole)
