"""Out-of-domain rules, their files and commands, on real images, a real (tiny) ViT and the bundled model."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from data_prep.prepare import PREPARED_SUFFIX
from pneumonia_vit.images import XrayReading, read_xray
from pneumonia_vit.ood.check import (
    CHECK_FILE,
    MAX_CHROMA,
    MIN_STD,
    STATS_FILE,
    DomainStats,
    KindModel,
    check_domain,
    check_input,
)
from pneumonia_vit.ood.corpus import adult_fold
from pneumonia_vit.ood.fit import fit_domain_stats
from pneumonia_vit.serving.service import Service
from tests.conftest import BUNDLED_MODEL

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(path for path in (REPO / "examples").glob("*.jpeg") if not path.name.startswith("adult_"))  # pediatric
ADULT_EXAMPLE = REPO / "examples" / "adult_1.jpeg"


@pytest.fixture(scope="module")
def small_adult_dir(data_root, tmp_path_factory) -> Path:
    """An adult_cxr_224/ of 40 real images, with their provenance.csv rows."""
    source = data_root / "adult_cxr_224"
    target = tmp_path_factory.mktemp("adult")
    with (source / "provenance.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))[:40]
    (target / "images").mkdir()
    for row in rows:
        shutil.copy(source / row["file"], target / row["file"])
    with (target / "provenance.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return target


@pytest.fixture(scope="module")
def model_with_stats(tiny_model_dir, small_prepared, small_adult_dir, tmp_path_factory) -> Path:
    """A copy of the tiny model with both fitted rules, fitted by the command line as a user would
    (a small kind model: one copy per film, 200 drawn images)."""
    folder = tmp_path_factory.mktemp("model_with_stats")
    for path in tiny_model_dir.iterdir():
        shutil.copy(path, folder / path.name)
    result = subprocess.run(
        [sys.executable, "-m", "pneumonia_vit.ood.fit", str(folder), "--data_dir", str(small_prepared),
         "--feature_stats", "--kind_model", "--adult_dir", str(small_adult_dir), "--copies", "1", "--synthetic_count", "200"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (folder / STATS_FILE).is_file() and (folder / CHECK_FILE).is_file()
    return folder


@pytest.fixture(scope="module")
def bundled_service() -> Service:
    if not (BUNDLED_MODEL / "config.json").is_file():
        pytest.skip("no bundled model")
    return Service.load(str(BUNDLED_MODEL))


def test_feature_stats_round_trip_and_cut_off(model_with_stats, small_prepared):
    stats = DomainStats.load(model_with_stats)
    assert stats is not None and stats.quantile == 0.999
    assert stats.mean.shape == (32,) and stats.precision.shape == (32, 32)
    assert stats.train_count == len(list((small_prepared / "train").rglob("*" + PREPARED_SUFFIX)))
    assert np.allclose(stats.precision, stats.precision.T)
    # By construction about 0.1 % of validation images lie beyond the cut-off; with 12 images, none or one.
    service = Service.load(str(model_with_stats))
    checks = [service.analyze(path, explain=False).domain
              for path in sorted((small_prepared / "validation").rglob("*" + PREPARED_SUFFIX))]
    assert sum(check.distance > check.distance_threshold for check in checks) <= 1


def test_kind_model_round_trip_cut_off_and_patient_folds(model_with_stats, small_prepared, small_adult_dir):
    kind_model = KindModel.load(model_with_stats)
    assert kind_model is not None
    counts = dict(item.split("=") for item in kind_model.metadata["training_inputs"].split(","))
    assert int(counts["pediatric_chest_xray"]) == len(list((small_prepared / "train").rglob("*" + PREPARED_SUFFIX)))
    assert int(counts["not_an_xray"]) == 200
    with (small_adult_dir / "provenance.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    fit_patients = {row["nih_patient_id"] for row in rows if adult_fold(row["nih_patient_id"]) == "fit"}
    assert 0 < len(fit_patients) < len({row["nih_patient_id"] for row in rows}), "some patients are held out"
    # The cut-off is the 1 % quantile of the validation split's P(pediatric): with 12 images, none or one below it.
    validation = sorted((small_prepared / "validation").rglob("*" + PREPARED_SUFFIX))
    inputs = np.stack([check_input(Image.open(path)) for path in validation])
    assert (kind_model.probabilities(inputs)[:, 0] < kind_model.threshold).sum() <= 1


def test_rule_three_adds_the_classifiers_child_score_set_with_this_kind_model(model_with_stats, small_prepared):
    stats, kind_model = DomainStats.load(model_with_stats), KindModel.load(model_with_stats)
    assert stats.child_weight.shape == (32,) and stats.combines_with(kind_model)
    service = Service.load(str(model_with_stats))
    validation = sorted((small_prepared / "validation").rglob("*" + PREPARED_SUFFIX))
    checks = [service.analyze(path, explain=False).domain for path in validation]
    # The combined cut-off is the validation split's 1 % quantile: with 12 images, none or one below it.
    assert all(check.kind_threshold == stats.kind_cutoff for check in checks)
    assert sum("kind" in check.fired for check in checks) <= 1

    # The score is the kind model's logit plus the child score: move the latter and the verdict follows.
    reading = read_xray(validation[0])
    _, features = service.classifier.probabilities_and_features([reading.image])
    p_pediatric = check_domain(reading, features, stats, kind_model).kind_probabilities["pediatric_chest_xray"]
    for shift, flagged in ((-1000.0, True), (1000.0, False)):
        moved = dataclasses.replace(stats, child_bias=stats.child_bias + shift)
        check = check_domain(reading, features, moved, kind_model)
        p = min(max(p_pediatric, 1e-7), 1 - 1e-7)  # kept finite where the softmax saturates
        assert check.kind_score == pytest.approx(np.log(p / (1 - p)) + moved.child_score(features)[0])
        assert ("kind" in check.fired) is flagged
    # Set with another kind model (one refitted since): rule 3 falls back to the kind model's own cut-off.
    stale = dataclasses.replace(stats, kind_model_fingerprint="another kind model")
    check = check_domain(reading, features, stale, kind_model)
    assert check.kind_score == p_pediatric and check.kind_threshold == kind_model.threshold


def test_fit_command_says_what_is_missing_and_writes_nothing(tiny_model_dir, small_prepared, small_adult_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    before = sorted(path.name for path in folder.iterdir())
    for extra, message in (
        (["--feature_stats", "--adult_dir", str(small_adult_dir)], "has none: fit it first (--kind_model)"),
        (["--kind_model"], "--kind_model needs --adult_dir"),
    ):
        result = subprocess.run([sys.executable, "-m", "pneumonia_vit.ood.fit", str(folder), "--data_dir",
                                 str(small_prepared), *extra], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert sorted(path.name for path in folder.iterdir()) == before


def test_kind_model_runs_the_trained_network_reproducibly_round_trips_and_refuses_other_formats(tmp_path):
    """Random thumbnails: the numpy forward equals the trained torch network's, the same seed gives the
    same weights, save and read keep the probabilities, and a file of another format gets the refit command
    of its own kind (the kind model's or the feature statistics')."""
    import torch
    from safetensors.numpy import save_file

    from pneumonia_vit.ood.check import CHECK_SIDE, KINDS
    from pneumonia_vit.ood.fit import kind_tensors, train_kind_network

    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(40, 1, CHECK_SIDE, CHECK_SIDE)).astype(np.float32)
    kinds = np.arange(40) % len(KINDS)
    network = train_kind_network(inputs, kinds, width=4, epochs=2, seed=3)
    model = KindModel(tensors=kind_tensors(network), threshold=0.2)
    again = KindModel(tensors=kind_tensors(train_kind_network(inputs, kinds, width=4, epochs=2, seed=3)), threshold=0.2)
    assert model.fingerprint == again.fingerprint
    probabilities = model.probabilities(inputs)
    with torch.inference_mode():
        expected = torch.softmax(network(torch.from_numpy(inputs)), dim=1).numpy()
    assert probabilities.shape == (40, len(KINDS)) and np.allclose(probabilities, expected, atol=1e-5)
    assert model.probabilities(inputs[0]).shape == (1, len(KINDS))  # one check_input thumbnail
    read = KindModel.read(model.save(tmp_path))
    assert read.threshold == 0.2 and read.fingerprint == model.fingerprint
    assert np.allclose(read.probabilities(inputs), probabilities, atol=1e-6)
    save_file({"layer0.weight": np.zeros((2, 2), np.float32)}, str(tmp_path / CHECK_FILE),
              {"format": "pneumonia_vit.domain_check/1", "threshold": "0.1"})
    with pytest.raises(ValueError, match="refit it .*--kind_model"):
        KindModel.read(tmp_path / CHECK_FILE)
    with pytest.raises(ValueError, match="refit it .*--feature_stats"):
        DomainStats.read(tmp_path / CHECK_FILE)


def test_kind_model_inputs_ignore_exposure_and_window():
    """A film with another brightness and contrast (a linear grey-level change) gives the same inputs."""
    film = np.asarray(Image.open(EXAMPLES[0]).convert("L"), dtype=np.float32)
    other = Image.fromarray(np.round(40 + 0.6 * film).astype(np.uint8))
    assert np.allclose(check_input(Image.fromarray(film.astype(np.uint8))), check_input(other), atol=0.05)


def test_bundled_check_flags_adult_turned_and_inverted_films_and_passes_the_examples(bundled_service):
    assert bundled_service.kind_model is not None, f"the bundled model ships {CHECK_FILE} (pneumonia_vit/ood/fit.py)"
    adult = bundled_service.analyze(ADULT_EXAMPLE, explain=False).domain
    assert adult.looks_like == "adult_chest_xray" and "adult chest X-ray" in adult.message() and "kind" in adult.fired
    for path in EXAMPLES:
        check = bundled_service.analyze(path, explain=False).domain
        assert check.kind_score >= check.kind_threshold and check.in_domain, path.name
        film = Image.open(path).convert("L")
        for altered in (film.transpose(Image.Transpose.ROTATE_90), ImageOps.invert(film)):
            check = bundled_service.analyze(altered, explain=False).domain
            assert not check.in_domain and check.looks_like in ("altered_chest_film", "not_an_xray"), path.name


def test_measure_command_reports_flag_rates(model_with_stats, small_prepared, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.domain_check", "--model", str(model_with_stats),
         "--measure", str(small_prepared / "test"), "--output", str(tmp_path / "domain_check")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [row] = json.loads((tmp_path / "domain_check.json").read_text())["sets"]
    assert row["images"] == len(list((small_prepared / "test").rglob("*" + PREPARED_SUFFIX)))
    assert 0 <= row["flagged"] <= row["images"] and set(row["looks_like"]) <= {
        "pediatric_chest_xray", "adult_chest_xray", "altered_chest_film", "not_an_xray", "unfamiliar_to_the_model"}


def test_fit_reads_images_past_a_training_transform(tiny_model_dir, small_prepared):
    """train_vit.py passes its splits with augmentation transforms set; the fit must see plain images."""
    from pneumonia_vit.inference.classifier import Classifier
    from pneumonia_vit.training.data import Augmentation, BatchTransform, load_splits, with_sample_index

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


def test_resolution_and_transparency_rules_name_the_cause_and_what_to_do():
    film = Image.open(EXAMPLES[0]).convert("L")
    assert check_domain(XrayReading(film, 0.0, stored_size=film.size, transparency=0.005), None, None, min_side=128).in_domain
    small = check_domain(XrayReading(film.resize((100, 90)), 0.0), None, None, min_side=128)
    assert small.fired == ["resolution"] and small.looks_like == "low_resolution"
    assert "only 100x90 pixels" in small.reasons[0] and "at least 128 pixels on the short side: upload" in small.reasons[0]
    # The file's own size counts, not the reduced copy a very large file is read into.
    assert check_domain(XrayReading(film.resize((100, 90)), 0.0, stored_size=(5000, 4500)), None, None, min_side=128).in_domain
    transparent = check_domain(XrayReading(film, 0.0, transparency=0.5), None, None)
    assert transparent.fired == ["transparency"] and transparent.looks_like == "transparent_image"
    assert "partly transparent (50% of pixels)" in transparent.reasons[0]
    assert "export the image without an alpha channel (flattened) and upload it again" in transparent.reasons[0]


def test_a_model_without_fitted_rules_borrows_the_bundled_kind_model_and_says_what_is_off(tiny_model_dir, caplog):
    """A train_vit.py run folder may lack the kind model, which does not depend on the classifier: the
    bundled one checks its inputs, and the start-up log says so and that the feature distance cannot run."""
    if not (BUNDLED_MODEL / CHECK_FILE).is_file():
        pytest.skip("no bundled kind model")
    with caplog.at_level(logging.WARNING, logger="pneumonia_vit.serving"):
        service = Service.load(str(tiny_model_dir))
    assert service.domain_stats is None and service.kind_model.fingerprint == KindModel.load(BUNDLED_MODEL).fingerprint
    assert len(service.check_notes) == 2 and all(note in caplog.text for note in service.check_notes)
    assert "the bundled model's" in service.check_notes[0] and "feature-distance check off" in service.check_notes[1]
    adult = service.analyze(ADULT_EXAMPLE, explain=False)
    assert "kind" in adult.domain.fired and adult.decision is None and "adult chest X-ray" in adult.refusal
    check = service.analyze(EXAMPLES[0], explain=False).domain
    assert check.distance is None and check.in_domain and "image-kind" in check.message()
    bare = Service(service.classifier, None, str(tiny_model_dir))
    assert "image-kind check off" in bare.check_notes[0] and "colour and contrast" in bare.analyze(EXAMPLES[0], False).domain.message()
