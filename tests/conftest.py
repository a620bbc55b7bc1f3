"""Shared fixtures: where the real data is, and small real models and datasets built from it.

The data folder is `--data-root` or $PNEUMONIA_DATA_ROOT (default: ../shared/data beside the
repo). Outside CI, tests that need it skip when it is absent; with CI=true they fail instead.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from tiny_vit import TINY_VIT

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

BUNDLED_MODEL = REPO / "models" / "pneumonia-vit-tiny"


def pytest_addoption(parser):
    parser.addoption("--data-root", default=None, help="folder holding chest_xray_224/ and chest_xray_originals/")


@pytest.fixture(scope="session")
def data_root(request) -> Path:
    root = Path(
        request.config.getoption("--data-root")
        or os.environ.get("PNEUMONIA_DATA_ROOT")
        or REPO.parent / "shared" / "data"
    )
    if not (root / "chest_xray_224").is_dir():
        message = f"real data not found at {root} (set --data-root or PNEUMONIA_DATA_ROOT)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return root


@pytest.fixture(scope="session")
def small_kaggle_tree(data_root, tmp_path_factory) -> Path:
    """A Kaggle-layout copy of a few real 224 px images: 24 train + 4 val + 12 test per class."""
    from pneumonia_vit.images import LABELS

    target = tmp_path_factory.mktemp("kaggle") / "chest_xray"
    counts = {"train": 24, "val": 4, "test": 12}
    for split, count in counts.items():
        for label in LABELS:
            folder = target / split / label
            folder.mkdir(parents=True)
            for path in sorted((data_root / "chest_xray_224" / split / label).iterdir())[:count]:
                shutil.copy(path, folder / path.name)
    return target


@pytest.fixture(scope="session")
def small_prepared(small_kaggle_tree, tmp_path_factory) -> Path:
    """small_kaggle_tree run through data_prep at 64 px."""
    from data_prep.prepare import PrepareArguments, prepare

    output = tmp_path_factory.mktemp("prepared") / "prepared"
    prepare(PrepareArguments(source=str(small_kaggle_tree), output=str(output), size=64,
                             validation_fraction=0.25, num_workers=1))
    return output


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised 64 px ViT saved like a trained one (weights, processor, threshold)."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    from pneumonia_vit.images import LABELS
    from pneumonia_vit.preprocess import PixelSpec

    torch.manual_seed(0)
    config = ViTConfig(num_labels=2, id2label=dict(enumerate(LABELS)), label2id={label: i for i, label in enumerate(LABELS)})
    config.update_from_string(TINY_VIT)
    config.decision_threshold = 0.42
    config.threshold_rule = "youden"
    folder = tmp_path_factory.mktemp("tiny_model")
    ViTForImageClassification(config).save_pretrained(folder)
    PixelSpec(size=64).processor().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def served_model_dir(request) -> Path:
    """The model the app tests serve: the bundled model when it exists, else `tiny_model_dir`."""
    if (BUNDLED_MODEL / "config.json").is_file():
        return BUNDLED_MODEL
    return request.getfixturevalue("tiny_model_dir")


@pytest.fixture(scope="module")
def classifier(served_model_dir):
    """What /predict and predict.py serve by default: the fast path (int8 ONNX Runtime)."""
    from pneumonia_vit.inference.classifier import Classifier

    return Classifier.load(str(served_model_dir), fast=True)


@pytest.fixture(scope="module")
def exact(served_model_dir):
    """What everything serves with PNEUMONIA_VIT_FAST=0: the fp32 PyTorch model."""
    from pneumonia_vit.inference.classifier import Classifier

    return Classifier.load(str(served_model_dir), fast=False)
