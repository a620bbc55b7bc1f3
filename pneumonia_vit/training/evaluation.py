"""Scoring a split and writing its report: metrics JSON, confusion-matrix and ROC plots.

train_vit.py and evaluate_vit.py both score through `Trainer.predict`, which gathers the
predictions of every process under `accelerate launch` and drops the padding that distributed
samplers add, so each image counts exactly once.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .images import LABELS
from .metrics import binary_metrics


def predict_scores(trainer, dataset) -> tuple[np.ndarray, np.ndarray]:
    """Labels and P(PNEUMONIA) for every image of `dataset`, in dataset order."""
    import torch

    output = trainer.predict(dataset)
    scores = torch.from_numpy(output.predictions).float().softmax(dim=-1)[:, 1].numpy()
    return output.label_ids.astype(int), scores


def write_report(labels, scores, threshold: float, output_dir: str | Path, split: str) -> dict:
    """Writes {split}_metrics.json, {split}_confusion_matrix.png and {split}_roc.png; returns the metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics = binary_metrics(labels, scores, threshold)
    (output_dir / f"{split}_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    matrix = metrics["confusion_matrix"]
    counts = np.array([[matrix["tn"], matrix["fp"]], [matrix["fn"], matrix["tp"]]])
    figure, axes = plt.subplots(figsize=(4, 3.6))
    axes.imshow(counts, cmap="Blues")
    for (row, column), count in np.ndenumerate(counts):
        axes.text(column, row, str(count), ha="center", va="center",
                  color="white" if count > counts.max() / 2 else "black")
    axes.set_xticks([0, 1], LABELS)
    axes.set_yticks([0, 1], LABELS)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(f"{split}: threshold {threshold:.3f}")
    figure.tight_layout()
    figure.savefig(output_dir / f"{split}_confusion_matrix.png", dpi=120)
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(4, 4))
    if len(set(np.asarray(labels).tolist())) == 2:
        fpr, tpr, _ = roc_curve(labels, scores)
        axes.plot(fpr, tpr, label=f"AUC {metrics['roc_auc']:.3f}")
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey")
    axes.scatter([1 - metrics["specificity"]], [metrics["sensitivity"]], color="red", zorder=3,
                 label=f"threshold {threshold:.3f}")
    axes.set_xlabel("1 - specificity")
    axes.set_ylabel("sensitivity")
    axes.set_title(f"ROC, {split} split")
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(output_dir / f"{split}_roc.png", dpi=120)
    plt.close(figure)
    return metrics
