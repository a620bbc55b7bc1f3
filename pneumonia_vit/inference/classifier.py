"""A trained classifier (a local folder or a Hub id), ready to score: a backend, its pixel spec and its model info."""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..preprocess import PixelSpec, pixel_array
from .backends import Backend, TorchBackend

DEFAULT_THRESHOLD = 0.5

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    """What serving reads from a model's config, once: the class names in output order (`id2label`)
    and the P(PNEUMONIA) cut-off train_vit.py chose on validation (`decision_threshold`)."""

    labels: tuple[str, ...]
    threshold: float
    threshold_stored: bool  # False: the model has no stored cut-off and DEFAULT_THRESHOLD applies

    @classmethod
    def from_config(cls, config: dict) -> ModelInfo:
        """`config`: config.json as a dict (or `PretrainedConfig.to_dict()`)."""
        id2label = {int(index): label for index, label in (config.get("id2label") or {}).items()}  # JSON keys are str
        stored = config.get("decision_threshold")
        return cls(labels=tuple(id2label[i] for i in range(len(id2label))),
                   threshold=float(DEFAULT_THRESHOLD if stored is None else stored), threshold_stored=stored is not None)


def load_pixel_spec(model_id: str) -> PixelSpec:
    """Input size and normalisation from the processor saved beside the model."""
    from transformers import AutoImageProcessor

    return PixelSpec.from_processor(AutoImageProcessor.from_pretrained(model_id, backend="pil"))


def _pixel_spec_from_json(folder: Path) -> PixelSpec:
    """`load_pixel_spec` for a local folder without importing transformers' image-processing stack (seconds at
    start-up); anything it does not recognise goes to `load_pixel_spec`."""
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
    """P(PNEUMONIA) for grayscale X-rays: a backend, the pixel spec it expects and the model's info."""

    def __init__(self, backend: Backend, spec: PixelSpec, info: ModelInfo, model_dir: str | Path,
                 model: torch.nn.Module | None = None):
        self.backend = backend
        self.spec = spec
        self.info = info
        self._model_dir = model_dir
        self._model = backend.model if isinstance(backend, TorchBackend) else model
        self._model_lock = threading.Lock()

    @property
    def labels(self) -> tuple[str, ...]:
        return self.info.labels

    @property
    def threshold(self) -> float:
        return self.info.threshold

    @property
    def model(self) -> torch.nn.Module:
        """The fp32 PyTorch model (loaded on first use when the fast path did not need it)."""
        with self._model_lock:  # two threads asking at once load it once
            if self._model is None:
                self._model = _torch_model(self._model_dir)
            return self._model

    @classmethod
    def load(cls, model_id: str, fast: bool = True, threads: int | None = None, cache: str | Path | None = None,
             keep_model: bool = False) -> Classifier:
        """`fast`: score through ONNX Runtime int8 (default), falling back to the fp32 PyTorch model, with a
        warning, where that backend is unavailable; False: the fp32 PyTorch model.
        `threads`, `cache`: the fast path's intra-op threads and export folder (`fast_path.load_fast_model`).
        `keep_model`: also have the PyTorch model (`.model`, read from disk once) in memory on return, for callers
        that need it anyway, such as the app's heatmaps; else the fast path reads it only when first used."""
        folder = _local_folder(model_id)
        # Plain JSON reads: a warm fast start imports neither the model classes nor the processor.
        info = ModelInfo.from_config(json.loads((folder / "config.json").read_text()))
        spec = _pixel_spec_from_json(folder)
        torch_model = functools.cache(lambda: _torch_model(folder))  # read from disk once, whoever asks first
        if fast:
            from . import fast_path

            try:
                backend = fast_path.load_fast_model(folder, spec, torch_model, threads=threads, cache=cache)
                return cls(backend, spec, info, folder, model=torch_model() if keep_model else None)
            except fast_path.FastPathUnavailable as error:
                # Only the fast path's expected failures (a package missing, an export this model does not
                # support) fall back; any other error is a bug, raised rather than hidden behind fp32.
                logger.warning("fast inference unavailable, using the fp32 PyTorch model: %s", error)
        return cls(TorchBackend(torch_model()), spec, info, folder)

    def probabilities_and_features(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray | None]:
        """Class probabilities (N, classes) and the classification head's input features (N, hidden;
        what the out-of-domain check reads, None where the backend cannot give them)."""
        logits, features = self.backend.run(pixel_array(images, self.spec))
        return softmax(logits), features

    def pneumonia_probability(self, images: Sequence[Image.Image]) -> np.ndarray:
        """P(PNEUMONIA) for each grayscale image."""
        return self.probabilities_and_features(images)[0][:, 1].astype(np.float32)


def _torch_model(folder: str | Path) -> torch.nn.Module:
    from transformers import AutoModelForImageClassification

    return AutoModelForImageClassification.from_pretrained(folder).eval()


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)
