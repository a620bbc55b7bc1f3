"""Loading a trained classifier (a local folder or a Hub id) with its preprocessing and threshold.

`Classifier.load(model_id)` serves through the fast path (pneumonia_vit.fast_inference: ONNX
Runtime, int8 weights) when onnxruntime and onnx are installed, and through the fp32 PyTorch model
otherwise or with `fast=False`. `.model`, the PyTorch model, stays
available either way (explanations need its attention weights); with a cached fast model it is
only read from disk when first used (or at once with `keep_model=True`).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .preprocess import PixelSpec, pixel_values

DEFAULT_THRESHOLD = 0.5

logger = logging.getLogger(__name__)


def stored_threshold(config) -> float:
    """The P(PNEUMONIA) cut-off train_vit.py chose on validation and saved in the model config."""
    return float(getattr(config, "decision_threshold", DEFAULT_THRESHOLD))


def load_pixel_spec(model_id: str) -> PixelSpec:
    """Input size and normalisation from the processor saved beside the model."""
    from transformers import AutoImageProcessor

    return PixelSpec.from_processor(AutoImageProcessor.from_pretrained(model_id, backend="pil"))


def _pixel_spec_from_json(folder: Path) -> PixelSpec:
    """`load_pixel_spec` for a local folder without importing transformers' image-processing stack
    (about 4 s and 130 MB on a 2-core machine); anything it does not recognise goes to `load_pixel_spec`."""
    try:
        saved = json.loads((folder / "preprocessor_config.json").read_text())
        return PixelSpec.from_settings(saved["size"], saved["image_mean"], saved["image_std"])
    except (OSError, ValueError, KeyError, TypeError):
        return load_pixel_spec(str(folder))


def _local_folder(model_id: str) -> Path:
    """The folder holding the model's files: model_id itself, or its Hub snapshot in the HF cache."""
    if Path(model_id).is_dir():
        return Path(model_id)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model_id, allow_patterns=["*.json", "*.safetensors"]))


class Classifier:
    """P(PNEUMONIA) for grayscale X-rays, with the model's input spec and stored threshold.

    `backend` names what `pneumonia_probability` runs: "onnxruntime-int8" or "torch-fp32".
    `labels`: the class names in output order (config.json `id2label`).
    """

    def __init__(self, model: torch.nn.Module | None, spec: PixelSpec, threshold: float,
                 fast_model=None, model_dir: str | None = None, labels: tuple[str, ...] | None = None):
        if model is None and model_dir is None:
            raise ValueError("give the PyTorch model or the folder to load it from")
        self._model = model
        self._model_dir = model_dir
        self._model_lock = threading.Lock()
        self.spec = spec
        self.threshold = threshold
        self.fast_model = fast_model
        if labels is None and model is not None:
            id2label = model.config.id2label
            labels = tuple(id2label[i] for i in range(len(id2label)))
        self.labels = labels

    @property
    def backend(self) -> str:
        return "onnxruntime-int8" if self.fast_model is not None else "torch-fp32"

    @property
    def model(self) -> torch.nn.Module:
        """The fp32 PyTorch model (loaded on first use when the fast path did not need it)."""
        with self._model_lock:  # two threads asking at once load it once
            if self._model is None:
                from transformers import AutoModelForImageClassification

                self._model = AutoModelForImageClassification.from_pretrained(self._model_dir).eval()
            return self._model

    @classmethod
    def load(cls, model_id: str, fast: bool = True, threads: int | None = None, cache: str | Path | None = None,
             keep_model: bool = False) -> Classifier:
        """`fast`: serve through ONNX Runtime int8 (default), falling back to the fp32 PyTorch model, with a
        warning, where that backend is unavailable; False: the fp32 PyTorch model.
        `threads`, `cache`: the fast path's intra-op threads and export folder (`fast_inference.load_fast_model`).
        `keep_model`: also have the PyTorch model in memory on return (for callers that need `.model`
        anyway, such as the app's heatmaps): it is then read from disk once, even on a first export."""
        if fast:
            from . import fast_inference

            try:
                folder = _local_folder(model_id)
                # Plain JSON reads: a warm start imports neither the model classes nor the processor.
                config = json.loads((folder / "config.json").read_text())
                threshold = float(config.get("decision_threshold", DEFAULT_THRESHOLD))
                id2label = config.get("id2label") or {}
                labels = tuple(id2label[str(i)] for i in range(len(id2label)))
                spec = _pixel_spec_from_json(folder)
                classifier = cls(None, spec, threshold, model_dir=str(folder), labels=labels)
                classifier.fast_model = fast_inference.load_fast_model(
                    folder, spec, lambda: classifier.model, threads=threads, cache=cache
                )
                if keep_model:
                    classifier.model  # noqa: B018  (loads it unless the export already did)
                else:
                    classifier._model = None  # loaded only for a first export; reloaded if asked for
                return classifier
            except fast_inference.FastPathUnavailable as error:
                # Only the fast path's expected failures (a package missing, an export this model does not
                # support) fall back; any other error is a bug, raised rather than hidden behind fp32.
                logger.warning("fast inference unavailable, using the fp32 PyTorch model: %s", error)
        from transformers import AutoModelForImageClassification

        model = AutoModelForImageClassification.from_pretrained(model_id).eval()
        return cls(model=model, spec=load_pixel_spec(model_id), threshold=stored_threshold(model.config))

    def probabilities_and_features(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray | None]:
        """Class probabilities (N, classes) and the classification head's input features (N, hidden;
        what the out-of-domain check reads, None where the fast graph does not export them)."""
        if self.fast_model is not None:
            from .fast_inference import softmax
            from .preprocess import pixel_array

            outputs = self.fast_model.run(pixel_array(images, self.spec))
            return softmax(outputs["logits"]), outputs.get("features")
        from .explain import forward

        result = forward(self.model, pixel_values(images, self.spec))
        return result.probabilities, result.features

    def pneumonia_probability(self, images: Sequence[Image.Image]) -> np.ndarray:
        """P(PNEUMONIA) for each grayscale image."""
        return self.probabilities_and_features(images)[0][:, 1].astype(np.float32)
