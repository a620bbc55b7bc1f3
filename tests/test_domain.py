"""Out-of-domain rules, the stats file and its command, on real images and a real (tiny) ViT."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.prepare import PREPARED_SUFFIX
from pneumonia_vit.domain import MAX_CHROMA, MIN_STD, STATS_FILE, DomainStats, check_domain, fit_domain_stats
from pneumonia_vit.images import XrayReading
from pneumonia_vit.serving import Service

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "examples").glob("*.jpeg"))


@pytest.fixture(scope="module")
def model_with_stats(tiny_model_dir, small_prepared, tmp_path_factory) -> Path:
    """A copy of the tiny model with stats fitted by the command line, as a user would."""
    folder = tmp_path_factory.mktemp("model_with_stats")
    for path in tiny_model_dir.iterdir():
        shutil.copy(path, folder / path.name)
    result = subprocess.run(
        [sys.executable, "-m", "pneumonia_vit.domain", str(folder), "--data_dir", str(small_prepared)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (folder / STATS_FILE).is_file()
    assert '"folder"' in result.stdout and '"flagged"' in result.stdout, "the firing rate on test/ is reported"
    return folder


def test_stats_round_trip_and_cut_off(model_with_stats, small_prepared):
    stats = DomainStats.load(model_with_stats)
    assert stats is not None and stats.quantile == 0.995
    assert stats.mean.shape == (32,) and stats.precision.shape == (32, 32)
    assert stats.train_count == len(list((small_prepared / "train").rglob("*" + PREPARED_SUFFIX)))
    assert np.allclose(stats.precision, stats.precision.T)
    # By construction about 0.5 % of validation images lie beyond the cut-off; with 12 images, none or one.
    service = Service.load(str(model_with_stats))
    flagged = [
        not service.analyze(path, explain=False).domain.in_domain
        for path in sorted((small_prepared / "validation").rglob("*" + PREPARED_SUFFIX))
    ]
    assert sum(flagged) <= 1


def test_fit_reads_images_past_a_training_transform(tiny_model_dir, small_prepared):
    """train_vit.py passes its splits with augmentation transforms set; the fit must see plain images."""
    from pneumonia_vit.data import Augmentation, BatchTransform, load_splits, with_sample_index
    from pneumonia_vit.model import Classifier

    classifier = Classifier.load(str(tiny_model_dir), fast=False)
    splits = load_splits(str(small_prepared))
    plain = fit_domain_stats(classifier.model, classifier.spec, splits["train"], splits["validation"])
    splits["train"] = with_sample_index(splits["train"])
    splits["train"].set_transform(BatchTransform(classifier.spec, Augmentation()))
    transformed = fit_domain_stats(classifier.model, classifier.spec, splits["train"], splits["validation"])
    assert np.allclose(plain.mean, transformed.mean) and plain.threshold == pytest.approx(transformed.threshold)
    paths = sorted((small_prepared / "train").rglob("*" + PREPARED_SUFFIX))
    from_paths = fit_domain_stats(classifier.model, classifier.spec, paths, paths[:5])
    assert from_paths.train_count == len(paths)


def test_colour_and_flat_rules():
    grey = Image.open(EXAMPLES[0]).convert("L")
    assert check_domain(XrayReading(grey, 0.0), None, None).in_domain
    colour = check_domain(XrayReading(grey, MAX_CHROMA + 20), None, None)
    assert not colour.in_domain and "colour" in colour.message()
    flat = check_domain(XrayReading(Image.new("L", (300, 300), 120), 0.0), None, None)
    assert not flat.in_domain and "blank" in flat.message() and flat.grey_std < MIN_STD


def test_service_flags_photo_blank_and_noise(model_with_stats):
    service = Service.load(str(model_with_stats))
    assert service.domain_stats is not None
    from matplotlib import cbook

    photo = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))  # a colour portrait
    assert "colour" in service.analyze(photo, explain=False).domain.message()
    rng = np.random.default_rng(0)
    blank = service.analyze(Image.new("L", (256, 256), 0), explain=False).domain
    assert not blank.in_domain and "blank" in blank.message()
    noise = Image.fromarray((rng.random((256, 256)) * 255).astype(np.uint8))
    noisy = service.analyze(noise, explain=False).domain
    assert noisy.distance is not None and noisy.distance > service.domain_stats.threshold, "noise is far in feature space"
    for path in EXAMPLES:
        assert service.analyze(path, explain=False).domain.chroma == 0.0


def test_model_without_stats_serves_with_rules_one_and_two(tiny_model_dir):
    service = Service.load(str(tiny_model_dir))
    assert service.domain_stats is None
    check = service.analyze(EXAMPLES[0], explain=False).domain
    assert check.distance is None and check.in_domain and "colour and contrast" in check.message()
