"""The fast serving path (ONNX Runtime, int8 weights) against the fp32 PyTorch path, on real X-rays.

Tolerance: int8 dynamic quantization moves P(PNEUMONIA) by at most PROBABILITY_TOLERANCE (0.02)
on these images; seen: about 0.001 with the conftest tiny model, 0.005 with a random model of the
bundled size. An image's score may differ by up to a quarter of that between batch sizes
(activation scales are per batch). The decision at the stored threshold must be the same for every image whose fp32
probability is farther than that tolerance from the threshold. The full test split
(benchmarks/inference.py) is where accuracy and ROC-AUC are compared.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumonia_vit.images import load_xray
from pneumonia_vit.preprocess import pixel_array, pixel_values

BUNDLED_MODEL = Path(__file__).resolve().parent.parent / "models" / "pneumonia-vit-tiny"

PROBABILITY_TOLERANCE = 0.02

try:  # the fast path's backend: a requirement, so CI fails without it; elsewhere these tests skip
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
except ImportError as missing:
    if os.environ.get("CI") == "true":
        raise
    pytest.skip(f"{missing.name} is not installed (pip install onnxruntime onnx)", allow_module_level=True)


@pytest.fixture(scope="module")
def fast_cache(tmp_path_factory) -> Path:
    """The test session's own export folder, never ~/.cache."""
    return tmp_path_factory.getbasetemp() / "fast-cache"


@pytest.fixture(scope="module")
def real_xrays(data_root) -> list:
    originals = data_root / "chest_xray_originals"
    paths = [
        *sorted((originals / "test" / "NORMAL").iterdir())[:4],
        *sorted((originals / "test" / "PNEUMONIA").iterdir())[:4],
        originals / "train" / "PNEUMONIA" / "person1010_virus_1695.jpeg",  # stored as RGB
        *sorted((data_root / "chest_xray_224" / "test" / "NORMAL").iterdir())[:2],  # 224 px copies
    ]
    return [load_xray(path) for path in paths]


def _model_dirs(tiny_model_dir) -> list[Path]:
    """The conftest tiny model, and the bundled one where it has been trained."""
    return [tiny_model_dir] + ([BUNDLED_MODEL] if (BUNDLED_MODEL / "config.json").is_file() else [])


def test_fast_path_matches_fp32_on_real_xrays(tiny_model_dir, real_xrays, fast_cache):
    from pneumonia_vit.inference.classifier import Classifier

    for folder in _model_dirs(tiny_model_dir):
        fast = Classifier.load(str(folder), cache=fast_cache)
        exact = Classifier.load(str(folder), fast=False)
        assert (fast.backend.name, exact.backend.name) == ("onnxruntime-int8", "torch-fp32")
        assert fast.spec == exact.spec and fast.threshold == exact.threshold
        ours, reference = fast.pneumonia_probability(real_xrays), exact.pneumonia_probability(real_xrays)
        assert ours.shape == reference.shape == (len(real_xrays),) and ours.dtype == np.float32
        difference = np.abs(ours - reference)
        assert difference.max() <= PROBABILITY_TOLERANCE, (folder, difference.max())
        clear = np.abs(reference - exact.threshold) > PROBABILITY_TOLERANCE
        assert ((ours >= fast.threshold) == (reference >= exact.threshold))[clear].all(), (folder, ours, reference)
        # Activations are quantized with one scale per batch, so an image's score moves slightly with
        # its batch companions (seen: < 0.001); one image at a time (the app) is exactly repeatable.
        single = np.concatenate([fast.pneumonia_probability([image]) for image in real_xrays[:3]])
        assert np.abs(single - ours[:3]).max() <= PROBABILITY_TOLERANCE / 4
        assert np.array_equal(single[:1], fast.pneumonia_probability(real_xrays[:1]))


def test_fast_features_match_the_pytorch_head_input(tiny_model_dir, real_xrays, fast_cache):
    """The exported graph also returns what the classifier head reads (the out-of-domain features)."""
    from pneumonia_vit.inference.classifier import Classifier

    fast = Classifier.load(str(tiny_model_dir), cache=fast_cache)
    _, features = fast.backend.run(pixel_array(real_xrays, fast.spec))
    captured = []
    model = fast.model  # the fp32 model, loaded lazily
    handle = model.classifier.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    with torch.inference_mode():
        model(pixel_values=pixel_values(real_xrays, fast.spec))
    handle.remove()
    assert features.shape == tuple(captured[0].shape)
    assert np.abs(features - captured[0].numpy()).max() < 0.1 * np.abs(captured[0].numpy()).max()


def test_cache_is_reused_and_keyed_by_weights(tiny_model_dir, tmp_path, fast_cache):
    import shutil

    from transformers import ViTForImageClassification

    from pneumonia_vit.inference.classifier import Classifier

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    first = Classifier.load(str(folder), cache=fast_cache)
    assert first._model is None  # served without keeping the PyTorch weights in memory
    second = Classifier.load(str(folder), cache=fast_cache)
    assert second.backend.startup["cache_hit"] and second.backend.path == first.backend.path
    assert second._model is None  # a cache hit never reads the PyTorch weights
    # New weights in the same folder: a new artefact, not the stale one.
    model = ViTForImageClassification.from_pretrained(folder)
    with torch.no_grad():
        model.classifier.bias += 1.0
    model.save_pretrained(folder)
    third = Classifier.load(str(folder), cache=fast_cache)
    assert not third.backend.startup["cache_hit"] and third.backend.path != first.backend.path


def test_disabled_fast_path_uses_pytorch(tiny_model_dir, fast_cache):
    from pneumonia_vit.inference.classifier import Classifier

    assert Classifier.load(str(tiny_model_dir), fast=False).backend.name == "torch-fp32"
    assert Classifier.load(str(tiny_model_dir), cache=fast_cache).backend.name == "onnxruntime-int8"


@pytest.mark.parametrize("failure", ["onnxruntime missing", "export fails"])
def test_fast_path_falls_back_with_a_warning(tiny_model_dir, real_xrays, monkeypatch, caplog, tmp_path, failure,
                                             fast_cache):
    import sys

    from pneumonia_vit.inference import fast_path
    from pneumonia_vit.inference.classifier import Classifier

    cache = fast_cache
    if failure == "onnxruntime missing":
        monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    else:
        cache = tmp_path / "empty-cache"  # forces an export

        def broken(*args, **kwargs):
            raise RuntimeError("exporter exploded")

        monkeypatch.setattr(fast_path, "export_int8", broken)
    with caplog.at_level(logging.WARNING, logger="pneumonia_vit.inference.classifier"):
        classifier = Classifier.load(str(tiny_model_dir), cache=cache)
    assert classifier.backend.name == "torch-fp32"
    assert "fast inference unavailable" in caplog.text
    reference = Classifier.load(str(tiny_model_dir), fast=False).pneumonia_probability(real_xrays)
    assert np.array_equal(classifier.pneumonia_probability(real_xrays), reference)


def test_a_bug_in_the_fast_path_is_raised_not_served_as_fp32(tiny_model_dir, monkeypatch, tmp_path):
    from pneumonia_vit.inference import fast_path
    from pneumonia_vit.inference.classifier import Classifier

    def buggy(model_dir):
        raise TypeError("a programming error inside the fast path")

    monkeypatch.setattr(fast_path, "fingerprint", buggy)
    with pytest.raises(TypeError, match="programming error"):
        Classifier.load(str(tiny_model_dir), cache=tmp_path)


def test_fast_load_reads_the_same_spec_and_threshold_as_transformers(tiny_model_dir, fast_cache):
    """The fast path reads preprocessor_config.json and config.json as plain JSON (no transformers
    import on a warm start); it must agree with AutoImageProcessor / AutoConfig."""
    from transformers import AutoConfig

    from pneumonia_vit.inference.classifier import Classifier, ModelInfo, _pixel_spec_from_json, load_pixel_spec

    for folder in _model_dirs(tiny_model_dir):
        assert _pixel_spec_from_json(folder) == load_pixel_spec(str(folder))
    fast = Classifier.load(str(tiny_model_dir), cache=fast_cache)
    assert fast.info == ModelInfo.from_config(AutoConfig.from_pretrained(tiny_model_dir).to_dict())
    assert fast.threshold == 0.42 and fast.info.threshold_stored


def test_fast_path_runs_with_the_threads_asked_for_else_every_usable_core(tiny_model_dir, fast_cache):
    from pneumonia_vit.cpus import usable_cores
    from pneumonia_vit.inference.classifier import Classifier

    assert Classifier.load(str(tiny_model_dir), cache=fast_cache, threads=1).backend.threads == 1
    assert Classifier.load(str(tiny_model_dir), cache=fast_cache).backend.threads == usable_cores()


def test_unwritable_cache_exports_into_a_temporary_folder(tiny_model_dir, tmp_path, real_xrays):
    from pneumonia_vit.inference.classifier import Classifier

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    classifier = Classifier.load(str(tiny_model_dir), cache=blocker / "cache")
    assert classifier.backend.name == "onnxruntime-int8"
    assert not str(classifier.backend.path).startswith(str(blocker))
    assert classifier.pneumonia_probability(real_xrays[:2]).shape == (2,)


def test_damaged_cache_entry_is_exported_again(tiny_model_dir, caplog, fast_cache):
    from pneumonia_vit.inference.classifier import Classifier

    first = Classifier.load(str(tiny_model_dir), cache=fast_cache)
    Path(first.backend.path).write_bytes(b"not an onnx model")
    with caplog.at_level(logging.WARNING):
        again = Classifier.load(str(tiny_model_dir), cache=fast_cache)
    assert again.backend.name == "onnxruntime-int8" and "exporting it again" in caplog.text
    assert Path(again.backend.path).stat().st_size > 1000


def test_a_cnn_hands_the_domain_check_the_same_features_on_the_fast_path_as_in_pytorch(tmp_path, real_xrays, fast_cache):
    """The out-of-domain statistics are fitted on the PyTorch path's features, (N, C); a CNN's head reads (N, C, 1, 1),
    and the fast path must give the check that same (N, C)."""
    from transformers import AutoConfig, AutoModelForImageClassification

    from pneumonia_vit.images import LABELS
    from pneumonia_vit.inference.classifier import Classifier
    from pneumonia_vit.preprocess import PixelSpec

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(Path(__file__).resolve().parent.parent / "configs" / "resnet_teacher",
                                        num_labels=2, id2label=dict(enumerate(LABELS)),
                                        label2id={label: i for i, label in enumerate(LABELS)})
    AutoModelForImageClassification.from_config(config).save_pretrained(tmp_path)
    PixelSpec(size=64).processor().save_pretrained(tmp_path)
    fast, exact = Classifier.load(str(tmp_path), cache=fast_cache), Classifier.load(str(tmp_path), fast=False)
    assert fast.backend.name == "onnxruntime-int8"
    (_, fast_features), (_, exact_features) = (classifier.probabilities_and_features(real_xrays[:2])
                                               for classifier in (fast, exact))
    assert fast_features.shape == exact_features.shape == (2, config.hidden_sizes[-1])
    assert np.abs(fast_features - exact_features).max() < 0.1 * np.abs(exact_features).max()
