"""Loading a trained classifier (a local folder or a Hub id) with its preprocessing and threshold."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .preprocess import PixelSpec, pixel_values

DEFAULT_THRESHOLD = 0.5


def stored_threshold(config) -> float:
    """The P(PNEUMONIA) cut-off train_vit.py chose on validation and saved in the model config."""
    return float(getattr(config, "decision_threshold", DEFAULT_THRESHOLD))


@dataclass
class Classifier:
    model: torch.nn.Module
    spec: PixelSpec
    threshold: float

    @classmethod
    def load(cls, model_id: str) -> "Classifier":
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        model = AutoModelForImageClassification.from_pretrained(model_id).eval()
        processor = AutoImageProcessor.from_pretrained(model_id, backend="pil")
        return cls(model=model, spec=PixelSpec.from_processor(processor), threshold=stored_threshold(model.config))

    @torch.inference_mode()
    def pneumonia_probability(self, images: Sequence[Image.Image]) -> np.ndarray:
        """P(PNEUMONIA) for each grayscale image."""
        logits = self.model(pixel_values=pixel_values(images, self.spec)).logits
        return logits.float().softmax(dim=-1)[:, 1].numpy()
