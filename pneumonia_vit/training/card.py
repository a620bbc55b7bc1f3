"""The model card (README.md of a trained model folder and of its Hub repo)."""

from __future__ import annotations

import re

import yaml

from ..images import LABELS

DATASET_CREDIT = (
    "Kermany D.S. et al., \"Identifying Medical Diagnoses and Treatable Diseases by Image-Based Deep "
    "Learning\", Cell 172(5):1122-1131, 2018 (data: Mendeley Data doi:10.17632/rscbjbr9sj.2; Kaggle "
    "paultimothymooney/chest-xray-pneumonia), licensed CC BY 4.0"
)


def _front_matter(tags: list[str], **more) -> str:
    front_matter = {"license": "cc-by-4.0", "library_name": "transformers", "pipeline_tag": "image-classification",
                    "tags": tags, **more}
    return f"---\n{yaml.safe_dump(front_matter, sort_keys=False).strip()}\n---"


def _row(name: str, metrics: dict) -> str:
    cells = [f"{metrics[key]:.3f}" for key in ("accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc")]
    matrix = metrics["confusion_matrix"]
    return f"| {name} ({metrics['n']}) | " + " | ".join(cells) + f" | {matrix['tn']} / {matrix['fp']} / {matrix['fn']} / {matrix['tp']} |"


def _architecture(config, spec) -> str:
    if config.model_type == "vit":
        return (f"A Vision Transformer ({config.num_hidden_layers} layers, width {config.hidden_size}, "
                f"{config.num_attention_heads} heads, patch {config.patch_size}, {spec.size}×{spec.size} input)")
    return f"A {type(config).__name__.removesuffix('Config')} model ({spec.size}×{spec.size} input)"


def calibration_section(config, eces: dict[str, tuple[float, float]]) -> str:
    """The card's calibration section; `eces`: split -> (ECE before, ECE after), as
    inference.calibration.reliability_diagram returns them beside calibration.png."""
    calibration = config.calibration
    prior = calibration["assumed_prior"]
    prior_text = (f"a pneumonia prior of **{prior:.0%}**: for a population with prior π, multiply the odds "
                  f"P/(1-P) by (π/(1-π)) / ({prior:.2f}/{1 - prior:.2f})" if prior is not None else
                  "the prior the model learned under its training loss (no stated number)")
    films = "validation split" if calibration["fitted_on"] == "validation" else calibration["fitted_on"]
    rows = "\n".join(f"| {split} | {before:.3f} | {after:.3f} |" for split, (before, after) in eces.items())
    return f"""## Calibration

P(PNEUMONIA) is calibrated inside the weights: a map σ(a·z + c) of the logit difference z, fitted on the
{films} (`{calibration['method']}`: a = {calibration['slope']:.4f}, c = {calibration['intercept']:.4f}) and folded
into the classification head, so a stock `pipeline()` gives the calibrated probability. The probabilities assume
{prior_text}. The decision threshold was mapped the same way, so every decision is the one the uncalibrated
model made. The method was chosen on those films by patient-grouped cross-validation over re-weighted class priors
(`python -m pneumonia_vit.inference.calibration`); the test split played no part in it.

Expected calibration error of P(PNEUMONIA), 10 equal-width bins (validation rows after: in-sample; a crop
is the middle of a film, as a tighter framing gives):

| split | before | after |
|---|---|---|
{rows}

![reliability diagram](calibration.png)

"""


def with_calibration(card: str, old_threshold: float | None, config, eces: dict[str, tuple[float, float]]) -> str:
    """An existing card after calibration: the new threshold where the old one was shown, and the calibration
    section (replaced if present) before `## Data`."""
    if old_threshold is not None:
        card = card.replace(f"{old_threshold:.4f}", f"{config.decision_threshold:.4f}")
    card = re.sub(r"## Calibration\n.*?(?=\n## )\n", "", card, flags=re.S)
    return card.replace("## Data\n", calibration_section(config, eces) + "## Data\n", 1)


def model_card(results, config, spec, class_counts, split_sizes, source, data, command, training_args,
               calibration_eces: dict[str, tuple[float, float]] | None = None, out_of_domain: list[str] = ()) -> str:
    """`out_of_domain`: sentences on the out-of-domain check the folder carries (ood.fit.add_domain_check)."""
    test_split = {"name": "Kermany chest X-ray (official test split)", "type": "chest-xray-pneumonia", "split": "test"}
    metrics = [{"type": key, "value": round(results["test"][key], 4)}
               for key in ("accuracy", "roc_auc", "sensitivity", "specificity", "f1")]
    header = _front_matter(["vision-transformer", "chest-x-ray", "pneumonia", "medical-imaging", "research-only"],
                           datasets=["paultimothymooney/chest-xray-pneumonia"],
                           **({} if source is None else {"base_model": source}),
                           **{"model-index": [{"name": "pneumonia-vit", "results": [{
                               "task": {"type": "image-classification"}, "dataset": test_split, "metrics": metrics}]}]})
    origin = f"fine-tuned from `{source}`" if source else "trained from scratch (random initialisation, no pretrained weights)"
    rows = "\n".join(_row(split, metrics) for split, metrics in results.items())
    domain = "".join(f"- {sentence}\n" for sentence in out_of_domain)
    if domain:
        domain = ("## Out-of-domain check\n\nThe app gives no diagnosis for an input that does not look like the "
                  f"training films (pneumonia_vit/ood/check.py). This folder carries:\n{domain}\n")
    return f"""{header}

# Pneumonia ViT: NORMAL vs PNEUMONIA on pediatric chest X-rays

{_architecture(config, spec)} {origin}, made with `train_vit.py` of the
pneumonia-vit project.

**Research demo, not a medical device.** It must not be used to diagnose, triage or treat anyone.

## Decision threshold

The model outputs P(PNEUMONIA). Predict PNEUMONIA when P(PNEUMONIA) ≥ **{config.decision_threshold:.4f}**.
This cut-off was chosen on the validation split with the rule `{config.threshold_rule}` and is
stored in `config.json` as `decision_threshold`; the test split played no part in choosing it.

## Results

Threshold {config.decision_threshold:.4f}; PNEUMONIA is the positive class. Confusion matrix as TN / FP / FN / TP.

| split (images) | accuracy | sensitivity | specificity | precision | F1 | ROC-AUC | confusion |
|---|---|---|---|---|---|---|---|
{rows}

The test split is the official Kermany test split, evaluated once after training. It was
collected from other patients than the training split and validation scores overstate test
scores on this dataset.

{calibration_section(config, calibration_eces) if calibration_eces else ""}{domain}## Data

Kermany et al. 2018 pediatric chest X-rays (ages 1–5, Guangzhou Women and Children's Medical
Center), prepared with `data_prep/prepare.py`: every image decoded as 8-bit grayscale and resized
to a square. The validation split was carved out of the official training split (plus the
official 16-image val split), grouped by patient and by byte-identical file, stratified by class.
Images used: {", ".join(f"{name} {size}" for name, size in split_sizes.items())};
training classes {", ".join(f"{LABELS[label]} {count}" for label, count in sorted(class_counts.items()))}
(class-weighted loss). Data source: `{data}`.

Dataset credit: {DATASET_CREDIT}.

## Training

```
{command}
```
Learning rate {training_args.learning_rate}, {training_args.num_train_epochs:g} epochs at most,
batch {training_args.per_device_train_batch_size} per device, seed {training_args.seed}; best
checkpoint chosen on validation `{training_args.metric_for_best_model}`.

## Intended use and limitations

- Intended for teaching and research on medical image classification.
- Trained on one hospital's pediatric anterior-posterior X-rays: adult radiographs, lateral views,
  other hospitals' equipment and other diseases are outside what it has seen, and its errors there
  are not measured.
- NORMAL vs PNEUMONIA only: it does not tell bacterial from viral pneumonia, nor detect anything else.
- Labels come from the dataset's expert grading, which has its own error rate.

## How to use

```python
from transformers import pipeline
classifier = pipeline("image-classification", model="path/or/hub-id")
scores = {{row["label"]: row["score"] for row in classifier("xray.jpeg")}}
is_pneumonia = scores["PNEUMONIA"] >= classifier.model.config.decision_threshold
```
"""


def encoder_card(config, images: int, folders: list[str], losses: list[float], command: str, training_args) -> str:
    """The card of a pretrain_mae.py output: what it is for, what it saw, and how it was made."""
    header = _front_matter(["vision-transformer", "vit-mae", "chest-x-ray", "self-supervised", "research-only"])
    loss = f"{losses[-1]:.4f}" if losses else "n/a"
    return f"""{header}

# ViT encoder pretrained as a masked autoencoder on chest X-rays

The encoder of a `ViTMAEForPreTraining` ({config.num_hidden_layers} layers, width {config.hidden_size},
patch {config.patch_size}, {config.image_size}×{config.image_size} input, mask ratio {config.mask_ratio}),
saved as a `ViTForImageClassification` whose NORMAL/PNEUMONIA head is **untrained**: it is a starting point
for `train_vit.py --model_name_or_path <this folder>`, not a classifier.

Pretrained on {images} unlabeled images from {", ".join(f"`{folder}`" for folder in folders)}; final
reconstruction loss {loss}. **Research use only, not a medical device.**

```
{command}
```
Learning rate {training_args.learning_rate}, {training_args.num_train_epochs} epochs, batch
{training_args.per_device_train_batch_size} per device, seed {training_args.seed}.
"""
