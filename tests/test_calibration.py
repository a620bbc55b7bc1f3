"""Calibration folded into the head: the ECE, the fit's refusals, and a tiny ViT trained on real films,
calibrated in-process and by the command line, then read back by a stock pipeline()."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumonia_vit.inference.calibration import (
    calibrate,
    expected_calibration_error,
    fit,
    fold,
    prior_weights,
)
from tests.real_subset import prepared_subset
from tests.tiny_vit import TINY_VIT


def test_ece_of_a_hand_worked_case():
    labels = [0, 0, 1, 1]
    scores = [0.05, 0.15, 0.15, 0.95]  # bins 0, 1, 1, 9
    # bin 0: |0 - 0.05| * 1/4; bin 1: |0.5 - 0.15| * 2/4; bin 9: |1 - 0.95| * 1/4
    assert expected_calibration_error(labels, scores) == pytest.approx(0.0125 + 0.175 + 0.0125)
    # weights 1, 1, 3, 3 (total 8): bin 1's share with pneumonia becomes 3/4
    assert expected_calibration_error(labels, scores, weights=[1, 1, 3, 3]) == pytest.approx(
        0.05 / 8 + 0.6 * 4 / 8 + 0.05 * 3 / 8)
    assert expected_calibration_error([1], [1.0]) == 0  # a score of exactly 1 falls in the last bin


def test_prior_weights_give_the_stated_pneumonia_share():
    labels = np.array([0] * 10 + [1] * 30)
    weights = prior_weights(labels, 0.4)
    assert np.dot(weights, labels) / weights.sum() == pytest.approx(0.4)


def test_scores_that_rank_the_classes_backwards_are_refused():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = np.clip(0.5 - 0.3 * (labels - 0.5) + rng.normal(0, 0.2, 200), 0.01, 0.99)
    with pytest.raises(ValueError, match="do not rank"):
        fit(labels, scores, "platt")


def test_folding_into_deit_moves_the_mean_of_both_heads():
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    torch.manual_seed(0)
    config = DeiTConfig(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, num_labels=2)
    model = DeiTForImageClassificationWithTeacher(config).eval()
    pixels = torch.randn(4, 3, 32, 32)
    before = model(pixel_values=pixels).logits
    fold(model, 1.7, -0.3)
    after = model(pixel_values=pixels).logits
    torch.testing.assert_close(after[:, 1] - after[:, 0], 1.7 * (before[:, 1] - before[:, 0]) - 0.3)


@pytest.fixture(scope="module")
def prepared(data_root, tmp_path_factory) -> Path:
    """Real films at 64 px: validation carved from 40 + 40 official train films, and 30 + 30 test films."""
    return prepared_subset(data_root, tmp_path_factory.mktemp("calibration_data"),
                           {"train": (40, 40), "test": (30, 30)}, validation_fraction=0.5)


@pytest.fixture(scope="module")
def trained_tiny_dir(data_root, tmp_path_factory) -> Path:
    """A tiny ViT trained for a few seconds on 120 + 120 other real train films, so its scores rank the classes
    (a random one's may not), saved like a train_vit.py run with a threshold."""
    from transformers import ViTConfig, ViTForImageClassification

    from pneumonia_vit.images import LABELS, load_xray
    from pneumonia_vit.preprocess import PixelSpec, pixel_values

    spec = PixelSpec(size=64)
    images, labels = [], []
    for label, name in enumerate(LABELS):
        for path in sorted((data_root / "chest_xray_224" / "train" / name).iterdir())[100:220]:
            images.append(load_xray(path))
            labels.append(label)
    pixels, targets = pixel_values(images, spec), torch.tensor(labels)
    torch.manual_seed(0)
    config = ViTConfig(num_labels=2, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    config.update_from_string(TINY_VIT)
    model = ViTForImageClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(6):
        for batch in torch.randperm(len(targets)).split(16):
            loss = torch.nn.functional.cross_entropy(model(pixel_values=pixels[batch]).logits, targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.config.decision_threshold = 0.45
    model.config.threshold_rule = "youden"
    folder = tmp_path_factory.mktemp("trained_tiny")
    model.save_pretrained(folder)
    spec.processor().save_pretrained(folder)
    return folder


def _pipeline_scores(model_dir: Path, files: list[Path]) -> np.ndarray:
    from transformers import pipeline

    classifier = pipeline("image-classification", model=str(model_dir), device="cpu")
    answers = classifier([str(path) for path in files], top_k=2)
    return np.array([next(row["score"] for row in answer if row["label"] == "PNEUMONIA") for answer in answers])


def _films(prepared: Path, split: str) -> tuple[list[Path], np.ndarray]:
    files = sorted((prepared / split).glob("*/*"))
    return files, np.array([int(path.parent.name == "PNEUMONIA") for path in files])


def test_calibrated_model_keeps_every_decision_and_a_stock_pipeline_gives_its_probabilities(
        prepared, trained_tiny_dir, tmp_path):
    from transformers import AutoModelForImageClassification

    files, labels = _films(prepared, "validation")
    test_files, _ = _films(prepared, "test")
    before = _pipeline_scores(trained_tiny_dir, files)
    test_before = _pipeline_scores(trained_tiny_dir, test_files)
    model = AutoModelForImageClassification.from_pretrained(trained_tiny_dir)
    calibration = calibrate(model, labels, before)
    assert calibration.slope > 0 and set(calibration.cross_validated_ece) == {"temperature", "platt", "balanced_platt",
                                                                      "prior_shifted"}
    assert calibration.validation_ece_after < calibration.validation_ece_before
    model.save_pretrained(tmp_path)
    shutil.copy(trained_tiny_dir / "preprocessor_config.json", tmp_path)

    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["calibration"]["method"] == calibration.method
    assert stored["decision_threshold"] == pytest.approx(float(calibration.apply(0.45)))
    for old, files_scored in ((before, files), (test_before, test_files)):
        new = _pipeline_scores(tmp_path, files_scored)
        np.testing.assert_allclose(new, calibration.apply(old), atol=1e-4)
        np.testing.assert_array_equal(new >= stored["decision_threshold"], old >= 0.45)
        assert (new != old).any()


def test_command_fits_on_whole_and_cropped_validation_films_writes_the_card_and_refuses_to_do_it_twice(
        prepared, trained_tiny_dir, tmp_path):
    """By default the command fits on the operating point's set, each validation film whole and its middle 80%
    (the crop in its film's patient group); the card reports validation whole and pooled, and test."""
    folder = tmp_path / "model"
    shutil.copytree(trained_tiny_dir, folder)
    (folder / "README.md").write_text("Predict PNEUMONIA when P(PNEUMONIA) ≥ **0.4500**.\n\n## Data\n\nfilms\n")
    command = [sys.executable, "-m", "pneumonia_vit.inference.calibration", str(folder), "--data_dir", str(prepared),
               "--batch_size", "16"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    config = json.loads((folder / "config.json").read_text())
    assert config["calibration"]["fitted_on"] == "validation films whole and centre-cropped to 80%, pooled"
    assert (folder / "calibration.png").stat().st_size > 0
    card = (folder / "README.md").read_text()
    assert f"≥ **{config['decision_threshold']:.4f}**" in card
    assert card.index("## Calibration") < card.index("## Data")
    assert all(f"| {row} |" in card for row in ("validation", "validation + 80% crops", "test"))

    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0
    assert "already calibrated" in again.stderr and "uncalibrated model" in again.stderr
    assert json.loads((folder / "config.json").read_text()) == config


def test_command_refuses_a_crop_that_is_not_a_fraction_before_reading_any_film(trained_tiny_dir, tmp_path):
    command = [sys.executable, "-m", "pneumonia_vit.inference.calibration", str(trained_tiny_dir), "--data_dir",
               str(tmp_path / "absent"), "--centre_crop", "1.5"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "fraction of the film's width and height" in done.stderr

