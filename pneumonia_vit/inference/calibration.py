"""Calibrated P(PNEUMONIA) inside the model: a map sigma(a * z + c) of the logit difference z = l1 - l0, chosen and
fitted on validation by the rule of benchmarks/results/calibration.md, folded into the classification head (so a
stock `pipeline()` gives it) with the stored threshold mapped alike (so no decision changes).

    python -m pneumonia_vit.inference.calibration MODEL_DIR --data_dir DATA_DIR [--centre_crop 0.8]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.special import expit, logit

BINS = 10
RULE_PRIORS = tuple(np.round(np.arange(0.40, 0.801, 0.05), 2))  # the deployment priors the rule plans for
FOLDS, REPEATS = 5, 5
SHARD_SIZE = "9MB"  # the bundled model's layout: weight shards under 10 MB
# name -> (fits an intercept, prior: None = the films as they are; else class-balanced weights, then the
# intercept moved to this prior; 0.6 is the middle of RULE_PRIORS)
METHODS = {"temperature": (False, None), "platt": (True, None), "balanced_platt": (True, 0.5), "prior_shifted": (True, 0.6)}


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
        return mapped(p_pneumonia, self.slope, self.intercept)


def mapped(p_pneumonia, slope: float, intercept: float) -> np.ndarray:
    return expit(slope * _logit(p_pneumonia) + intercept)


def _logit(p) -> np.ndarray:
    return logit(np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12))


def expected_calibration_error(labels, p_pneumonia, bins: int = BINS, weights=None) -> float:
    """ECE over `bins` equal-width bins (a score of exactly 1 falls in the last), of the `weights`-weighted films."""
    labels, p = np.asarray(labels, dtype=np.float64), np.asarray(p_pneumonia, dtype=np.float64)
    weights = np.ones_like(p) if weights is None else np.asarray(weights, dtype=np.float64)
    index = np.minimum((p * bins).astype(int), bins - 1)
    gaps = np.bincount(index, weights * (labels - p), minlength=bins)  # per bin: mass x (share - mean P)
    return float(np.abs(gaps).sum() / weights.sum())


def prior_weights(labels, prior: float) -> np.ndarray:
    """Importance weights that turn the films' class balance into `prior` pneumonia."""
    labels = np.asarray(labels)
    return np.where(labels == 1, prior / labels.mean(), (1 - prior) / (1 - labels.mean()))


def fit(labels, p_pneumonia, method: str) -> tuple[float, float]:
    """(slope a, intercept c) of `method` by weighted maximum likelihood (Newton's method on the log loss)."""
    with_intercept, prior = METHODS[method]
    labels, z = np.asarray(labels, dtype=np.float64), _logit(p_pneumonia)
    weights = np.ones_like(z) if prior is None else prior_weights(labels, 0.5)
    design = np.stack([z, np.ones_like(z)], axis=1) if with_intercept else z[:, None]
    theta = np.zeros(design.shape[1])  # from zero: no step overshoots on non-separable data
    for _ in range(100):
        p = expit(design @ theta)
        hessian = (design * (weights * p * (1 - p))[:, None]).T @ design + 1e-9 * np.eye(len(theta))
        step = np.linalg.solve(hessian, design.T @ (weights * (p - labels)))
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    slope, intercept = float(theta[0]), float(theta[1]) if with_intercept else 0.0
    if not (np.isfinite(slope) and np.isfinite(intercept)) or abs(slope) > 1e3:
        raise ValueError("the validation scores separate the classes perfectly: there is no calibration to fit")
    if slope <= 0:
        raise ValueError(f"the fitted slope is {slope:.3g}: the model's scores do not rank validation's classes, "
                         "and a non-increasing map would change its decisions")
    return slope, intercept + (0.0 if prior is None else float(logit(prior)))


def choose_method(labels, p_pneumonia, groups=None) -> dict[str, dict[str, float]]:
    """Each method's out-of-fold ECE (FOLDS stratified folds, grouped by `groups` when given, REPEATS seeds) on
    the films' own balance and averaged over RULE_PRIORS."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    labels, p = np.asarray(labels), np.asarray(p_pneumonia, dtype=np.float64)
    splitter = StratifiedKFold if groups is None else StratifiedGroupKFold
    weightings = [None] + [prior_weights(labels, prior) for prior in RULE_PRIORS]
    eces = {method: [] for method in METHODS}  # per method: one row per seed, [own, prior 1, prior 2, ...]
    for seed in range(REPEATS):
        folds = list(splitter(FOLDS, shuffle=True, random_state=seed).split(p, labels, groups))
        for method, rows in eces.items():
            out_of_fold = np.empty_like(p)
            for train, held_out in folds:
                slope, intercept = fit(labels[train], p[train], method)
                out_of_fold[held_out] = mapped(p[held_out], slope, intercept)
            rows.append([expected_calibration_error(labels, out_of_fold, weights=w) for w in weightings])
    return {method: {"ece_own_prior": round(float(np.mean(np.array(rows)[:, 0])), 4),
                     "ece_prior_averaged": round(float(np.mean(np.array(rows)[:, 1:])), 4)} for method, rows in eces.items()}


def _logit_heads(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """The linear layers whose outputs are the logits: `classifier`, or both heads of a distilled DeiT (mean)."""
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
    if done := getattr(config, "calibration", None):
        raise ValueError(f"the model is already calibrated ({done['method']}, slope {done['slope']:.4g}, intercept "
                         f"{done['intercept']:.4g}, fitted on {done['fitted_on']}); a second map would be fitted on "
                         "scores it already calibrated: calibrate the uncalibrated model instead")


def calibrate(model, labels, p_pneumonia, groups=None, method: str | None = None, fitted_on: str = "validation") -> Calibration:
    """Fits the map on validation films (labels 0/1, the unfolded model's fp32 P(PNEUMONIA); `groups`: their
    patients, for the rule's folds) by `method` or the one `choose_method` ranks first; folds it into `model`'s head
    and rewrites `model.config.decision_threshold` (when set) and `model.config.calibration`."""
    _refuse_calibrated(model.config)
    _logit_heads(model)  # refuses a model without a head to fold into before any fitting
    table = choose_method(labels, p_pneumonia, groups)
    method = method or min(table, key=lambda name: table[name]["ece_prior_averaged"])  # ties: the first listed
    slope, intercept = fit(labels, p_pneumonia, method)
    prior = float(np.mean(labels)) if method == "platt" else METHODS[method][1]
    after = expected_calibration_error(labels, mapped(p_pneumonia, slope, intercept))
    calibration = Calibration(method, slope, intercept, prior, expected_calibration_error(labels, p_pneumonia), after,
                              table, fitted_on)
    fold(model, slope, intercept)
    if (threshold := getattr(model.config, "decision_threshold", None)) is not None:
        model.config.decision_threshold = float(calibration.apply(threshold))
    model.config.calibration = asdict(calibration)
    return calibration


def reliability_diagram(splits: dict[str, tuple], calibration: Calibration, path: str | Path) -> dict[str, tuple[float, float]]:
    """Draws each split ({name: (labels, uncalibrated P)}) before and after `calibration` into `path`;
    returns {name: (ECE before, ECE after)}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(splits), figsize=(4.6 * len(splits), 4.2), squeeze=False)
    eces = {}
    for axis, (name, (labels, p)) in zip(axes[0], splits.items()):
        labels, both = np.asarray(labels), {"before": np.asarray(p, dtype=np.float64), "after": calibration.apply(p)}
        eces[name] = tuple(expected_calibration_error(labels, scores) for scores in both.values())
        for (when, scores), ece, style in zip(both.items(), eces[name], ("o--", "s-")):
            index = np.minimum((scores * BINS).astype(int), BINS - 1)
            bins = np.unique(index)
            axis.plot([scores[index == b].mean() for b in bins], [labels[index == b].mean() for b in bins], style,
                      label=f"{when}: ECE {ece:.3f}")
        axis.plot([0, 1], [0, 1], color="grey", linewidth=0.8)
        axis.set(title=f"{name} ({len(labels)} films)", xlabel="mean P(PNEUMONIA) in bin", ylabel="share with pneumonia",
                 xlim=(0, 1), ylim=(0, 1))
        axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return eces


def calibrate_operating_point(model, point, validation, fitted_on: str) -> Calibration:
    """`calibrate` on the films the threshold of `point` (training.evaluation.operating_point) was picked on from the
    `validation` split, each centre crop in its film's patient group."""
    from datasets import Image

    from ..images import patient_id

    films = validation.with_format(None).cast_column("image", Image(decode=False))["image"]
    groups = [patient_id(Path(film["path"]).name) for film in films] * (len(point.films[0]) // len(point.whole[0]))
    return calibrate(model, *point.films, groups=groups, fitted_on=fitted_on)


def main(argv: list[str] | None = None) -> Calibration:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path, help="a model folder written by train_vit.py (saved back in place)")
    parser.add_argument("--data_dir", required=True, help="the folder data_prep/prepare.py wrote")
    parser.add_argument("--centre_crop", type=float, default=0.8, help="fit on the validation films pooled with their "
                        "middle, this fraction of their side: the operating point's threshold_centre_crop (1: whole films)")
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args(argv)

    from transformers import AutoModelForImageClassification

    from ..training.card import with_calibration
    from ..training.data import BatchTransform, load_splits
    from ..training.evaluation import ThresholdPolicy, operating_point, predict_scores, scoring_trainer, write_report
    from .classifier import load_pixel_spec

    model = AutoModelForImageClassification.from_pretrained(args.model_dir)
    try:
        policy = ThresholdPolicy(threshold_centre_crop=args.centre_crop)
        _refuse_calibrated(model.config)
    except ValueError as error:
        raise SystemExit(f"{args.model_dir}: {error}") from None
    splits, spec = load_splits(args.data_dir), load_pixel_spec(str(args.model_dir))
    for name in ("validation", "test"):
        splits[name].set_transform(BatchTransform(spec))
    # Both splits are scored by the unfolded model; the fit reads validation only, test is first looked at below.
    with scoring_trainer(model, args.batch_size) as trainer:
        point = operating_point(trainer, splits["validation"], spec, policy)
        scored = {"validation": point.whole, "test": predict_scores(trainer, splits["test"])}
    pooled_name = "validation" if args.centre_crop == 1 else f"validation + {args.centre_crop:.0%} crops"
    old_threshold = getattr(model.config, "decision_threshold", None)
    calibration = calibrate_operating_point(model, point, splits["validation"], policy.films())
    for name, (_, scores) in {pooled_name: point.films, "test": scored["test"]}.items():
        changed = old_threshold is not None and int(((calibration.apply(scores) >= model.config.decision_threshold)
                                                     != (scores >= old_threshold)).sum())
        if changed:
            raise SystemExit(f"folding the calibration would change {changed} {name} decisions: nothing saved")
    model.save_pretrained(args.model_dir, max_shard_size=SHARD_SIZE)
    labels, scores = scored["validation"]
    eces = {"validation": (expected_calibration_error(labels, scores), expected_calibration_error(labels, calibration.apply(scores)))}
    eces |= reliability_diagram({pooled_name: point.films, "test": scored["test"]}, calibration,
                                args.model_dir / "calibration.png")
    for name, (labels, scores) in scored.items():
        if (args.model_dir / f"{name}_metrics.json").is_file():
            write_report(labels, calibration.apply(scores), model.config.decision_threshold, args.model_dir, name)
    if (card := args.model_dir / "README.md").is_file():
        card.write_text(with_calibration(card.read_text(), old_threshold, model.config, eces))
    print(json.dumps({"calibration": model.config.calibration, "ece_before_after": eces}, indent=1))
    return calibration


if __name__ == "__main__":
    main()
