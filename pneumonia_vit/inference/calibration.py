"""Calibrated P(PNEUMONIA) inside the model itself.

A logistic map p = sigma(a * z + c) of the logit difference z = l1 - l0 is fitted on the validation split and
folded into the classification head (scale both logit rows by a, add c to PNEUMONIA's bias), so the saved
weights, a stock `pipeline("image-classification")` and the app all give the calibrated P. The stored decision
threshold t becomes sigma(a * logit(t) + c): with a > 0 every decision stays the same.

Which map (`METHODS`) is chosen by `choose_method`, on validation alone: each candidate is fitted by
cross-validation inside the validation split (patient-grouped folds when groups are given) and scored by its
out-of-fold ECE averaged over validation re-weighted to pneumonia priors of 40%..80% (`RULE_PRIORS`), so a map
that only fits validation's own class balance loses. benchmarks/results/calibration.md has the numbers.

    python -m pneumonia_vit.inference.calibration MODEL_DIR --data_dir DATA_DIR
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.special import expit, logit

BINS = 10
RULE_PRIORS = tuple(np.round(np.arange(0.40, 0.801, 0.05), 2))
FOLDS, REPEATS = 5, 5
SHARD_SIZE = "9MB"  # the bundled model's layout: weight shards under 10 MB
# The stated prior of "prior_shifted": the middle of RULE_PRIORS, the range of deployment priors the rule plans for.
SHIFTED_PRIOR = 0.6
# name -> (fits an intercept, class-balanced weights, prior the intercept is then set to)
METHODS = {
    "temperature": (False, False, None),
    "platt": (True, False, None),
    "balanced_platt": (True, True, 0.5),
    "prior_shifted": (True, True, SHIFTED_PRIOR),
}


@dataclass
class Calibration:
    method: str
    slope: float
    intercept: float
    assumed_prior: float | None  # P(PNEUMONIA) before seeing the film that the probabilities assume
    validation_ece_before: float
    validation_ece_after: float  # in-sample: the map was fitted on these films
    cross_validated_ece: dict[str, dict[str, float]] = field(default_factory=dict)  # choose_method's table
    fitted_on: str = "validation"

    def apply(self, p_pneumonia) -> np.ndarray:
        """What the folded model answers for a film the unfolded one gave `p_pneumonia`."""
        return expit(self.slope * _logit(p_pneumonia) + self.intercept)


def _logit(p) -> np.ndarray:
    return logit(np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12))


def expected_calibration_error(labels, p_pneumonia, bins: int = BINS, weights=None) -> float:
    """ECE of P(PNEUMONIA) over `bins` equal-width bins (a score of exactly 1 falls in the last); with `weights`,
    of the weighted population (importance weights re-weight the films to another class prior)."""
    labels = np.asarray(labels, dtype=np.float64)
    p = np.asarray(p_pneumonia, dtype=np.float64)
    weights = np.ones_like(p) if weights is None else np.asarray(weights, dtype=np.float64)
    index = np.minimum((p * bins).astype(int), bins - 1)
    total = weights.sum()
    error = 0.0
    for b in np.unique(index):
        members = index == b
        mass = weights[members].sum()
        error += abs(np.dot(weights[members], labels[members] - p[members])) / mass * (mass / total)
    return float(error)


def prior_weights(labels, prior: float) -> np.ndarray:
    """Importance weights that turn the films' class balance into `prior` pneumonia."""
    labels = np.asarray(labels)
    own = labels.mean()
    return np.where(labels == 1, prior / own, (1 - prior) / (1 - own))


def fit(labels, p_pneumonia, method: str) -> tuple[float, float]:
    """(slope a, intercept c) of `method` by weighted maximum likelihood (Newton's method on the log loss)."""
    with_intercept, balanced, prior = METHODS[method]
    labels = np.asarray(labels, dtype=np.float64)
    z = _logit(p_pneumonia)
    weights = prior_weights(labels, 0.5) if balanced else np.ones_like(z)
    design = np.stack([z, np.ones_like(z)], axis=1) if with_intercept else z[:, None]
    theta = np.zeros(design.shape[1])  # Newton's method from zero: no step overshoots on non-separable data
    for _ in range(100):
        p = expit(design @ theta)
        gradient = design.T @ (weights * (p - labels))
        hessian = (design * (weights * p * (1 - p))[:, None]).T @ design + 1e-9 * np.eye(len(theta))
        step = np.linalg.solve(hessian, gradient)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    slope, intercept = float(theta[0]), float(theta[1]) if with_intercept else 0.0
    if not (math.isfinite(slope) and math.isfinite(intercept)) or abs(slope) > 1e3:
        raise ValueError("the validation scores separate the classes perfectly: there is no calibration to fit")
    if slope <= 0:
        raise ValueError(f"the fitted slope is {slope:.3g}: the model's scores do not rank validation's classes, "
                         "and a non-increasing map would change its decisions")
    if prior is not None:
        intercept += float(logit(prior))
    return slope, intercept


def choose_method(labels, p_pneumonia, groups=None) -> dict[str, dict[str, float]]:
    """Each method's out-of-fold ECE on validation's own balance and averaged over RULE_PRIORS.

    FOLDS folds, REPEATS times with fixed seeds; folds are stratified, and grouped (whole patients) when
    `groups` is given.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    labels = np.asarray(labels)
    p = np.asarray(p_pneumonia, dtype=np.float64)
    results = {}
    for method in METHODS:
        own, averaged = [], []
        for seed in range(REPEATS):
            if groups is None:
                folds = StratifiedKFold(FOLDS, shuffle=True, random_state=seed).split(p, labels)
            else:
                folds = StratifiedGroupKFold(FOLDS, shuffle=True, random_state=seed).split(p, labels, groups)
            out_of_fold = np.empty_like(p)
            for train, held_out in folds:
                slope, intercept = fit(labels[train], p[train], method)
                out_of_fold[held_out] = expit(slope * _logit(p[held_out]) + intercept)
            own.append(expected_calibration_error(labels, out_of_fold))
            averaged.append(np.mean([expected_calibration_error(labels, out_of_fold, weights=prior_weights(labels, prior))
                                     for prior in RULE_PRIORS]))
        results[method] = {"ece_own_prior": round(float(np.mean(own)), 4),
                           "ece_prior_averaged": round(float(np.mean(averaged)), 4)}
    return results


def _logit_heads(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """The linear layers whose outputs are the logits: `classifier`, or both heads of a DeiT with a
    distillation token (its logits are their mean)."""
    names = ("cls_classifier", "distillation_classifier") if hasattr(model, "cls_classifier") else ("classifier",)
    heads = [getattr(model, name, None) for name in names]
    heads = [head[-1] if isinstance(head, torch.nn.Sequential) else head for head in heads]
    if not all(isinstance(head, torch.nn.Linear) and head.out_features == 2 for head in heads):
        raise ValueError(f"{type(model).__name__}: no two-class linear head ({' + '.join(names)}) to fold a "
                         "calibration into")
    return heads


@torch.no_grad()
def fold(model: torch.nn.Module, slope: float, intercept: float) -> None:
    """Makes the model's logit difference a * z + c: both logit rows scaled by a, c added to PNEUMONIA's."""
    for head in _logit_heads(model):
        head.weight.mul_(slope)
        head.bias.mul_(slope)
        head.bias[1] += intercept


def _refuse_calibrated(config) -> None:
    done = getattr(config, "calibration", None)
    if done:
        raise ValueError(f"the model is already calibrated ({done['method']}, slope {done['slope']:.4g}, intercept "
                         f"{done['intercept']:.4g}, fitted on {done['fitted_on']}); a second map would be fitted on "
                         "scores it already calibrated: calibrate the uncalibrated model instead")


def calibrate(model, labels, p_pneumonia, groups=None, method: str | None = None) -> Calibration:
    """Fits a calibration on validation (labels 0/1, the unfolded model's fp32 P(PNEUMONIA); `groups`: patient
    ids for the rule's folds) with `method` or, by default, the one `choose_method` ranks first; folds it into
    `model`'s head and rewrites `model.config.decision_threshold` (when set) and `model.config.calibration`."""
    _refuse_calibrated(model.config)
    _logit_heads(model)  # refuses a model without a head to fold into before any fitting
    table = choose_method(labels, p_pneumonia, groups)
    method = method or min(table, key=lambda name: table[name]["ece_prior_averaged"])
    slope, intercept = fit(labels, p_pneumonia, method)
    calibration = Calibration(
        method=method, slope=slope, intercept=intercept,
        assumed_prior=float(np.mean(labels)) if method == "platt" else METHODS[method][2],
        validation_ece_before=expected_calibration_error(labels, p_pneumonia),
        validation_ece_after=0.0, cross_validated_ece=table)
    calibration.validation_ece_after = expected_calibration_error(labels, calibration.apply(p_pneumonia))
    fold(model, slope, intercept)
    threshold = getattr(model.config, "decision_threshold", None)
    if threshold is not None:
        model.config.decision_threshold = float(calibration.apply(threshold))
    model.config.calibration = asdict(calibration)
    return calibration


def reliability_diagram(splits: dict[str, tuple], calibration: Calibration, path: str | Path) -> dict[str, tuple[float, float]]:
    """Writes a reliability diagram per split ({name: (labels, uncalibrated P)}) before and after `calibration`;
    returns {name: (ECE before, ECE after)}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(splits), figsize=(4.2 * len(splits), 4), squeeze=False)
    eces = {}
    for axis, (name, (labels, p)) in zip(axes[0], splits.items()):
        labels = np.asarray(labels)
        eces[name] = (expected_calibration_error(labels, p), expected_calibration_error(labels, calibration.apply(p)))
        for scores, ece, style in ((np.asarray(p, dtype=np.float64), eces[name][0], "o--"),
                                   (calibration.apply(p), eces[name][1], "s-")):
            index = np.minimum((scores * BINS).astype(int), BINS - 1)
            used = [b for b in range(BINS) if (index == b).any()]
            axis.plot([scores[index == b].mean() for b in used], [labels[index == b].mean() for b in used], style,
                      label=f"{'before' if style == 'o--' else 'after'}: ECE {ece:.3f}")
        axis.plot([0, 1], [0, 1], color="grey", linewidth=0.8)
        axis.set(title=f"{name} ({len(labels)} films)", xlabel="mean P(PNEUMONIA) in bin", ylabel="share with pneumonia",
                 xlim=(0, 1), ylim=(0, 1))
        axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return eces


def _score(model, model_dir: str, dataset, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    from transformers import Trainer, TrainingArguments

    from ..training.data import BatchTransform, collate
    from ..training.evaluation import predict_scores
    from .classifier import load_pixel_spec

    dataset.set_transform(BatchTransform(load_pixel_spec(model_dir)))
    with tempfile.TemporaryDirectory() as scratch:
        trainer = Trainer(model=model, data_collator=collate,
                          args=TrainingArguments(output_dir=scratch, per_device_eval_batch_size=batch_size,
                                                 report_to="none", use_cpu=not torch.cuda.is_available(),
                                                 remove_unused_columns=False, label_names=["labels"]))
        return predict_scores(trainer, dataset)


def patients(dataset) -> list[str]:
    """The patient of each film of a prepared split, for `calibrate`'s groups."""
    from datasets import Image

    from ..images import patient_id

    return [patient_id(Path(row["path"]).name) for row in dataset.cast_column("image", Image(decode=False))["image"]]


def main(argv: list[str] | None = None) -> Calibration:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="a model folder written by train_vit.py (saved back in place)")
    parser.add_argument("--data_dir", required=True, help="the folder data_prep/prepare.py wrote")
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args(argv)

    from transformers import AutoModelForImageClassification

    from ..training.card import with_calibration
    from ..training.data import load_splits
    from ..training.evaluation import write_report

    model_dir = Path(args.model_dir)
    model = AutoModelForImageClassification.from_pretrained(model_dir)
    try:
        _refuse_calibrated(model.config)
    except ValueError as error:
        raise SystemExit(f"{model_dir}: {error}") from None
    splits = load_splits(args.data_dir)
    groups = patients(splits["validation"])
    scored = {name: _score(model, str(model_dir), splits[name], args.batch_size) for name in ("validation", "test")}
    old_threshold = getattr(model.config, "decision_threshold", None)
    # Both splits are scored by the unfolded model; the fit reads validation only, and test's scores are first
    # looked at below, once the calibration is fixed.
    calibration = calibrate(model, *scored["validation"], groups=groups)
    if old_threshold is not None:
        for name, (_, scores) in scored.items():
            changed = int(((calibration.apply(scores) >= model.config.decision_threshold) != (scores >= old_threshold)).sum())
            if changed:
                raise SystemExit(f"folding the calibration would change {changed} {name} decisions at the threshold: "
                                 f"nothing saved")
    model.save_pretrained(model_dir, max_shard_size=SHARD_SIZE)
    eces = reliability_diagram(scored, calibration, model_dir / "calibration.png")
    for name, (labels, scores) in scored.items():
        if (model_dir / f"{name}_metrics.json").is_file():
            write_report(labels, calibration.apply(scores), model.config.decision_threshold, model_dir, name)
    card = model_dir / "README.md"
    if card.is_file():
        card.write_text(with_calibration(card.read_text(), old_threshold, model.config, eces))
    print(json.dumps({"calibration": model.config.calibration, "ece_before_after": eces}, indent=1))
    return calibration


if __name__ == "__main__":
    main()
