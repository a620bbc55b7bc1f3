"""Grayscale X-ray -> model input, the same for training, evaluation and the app.

The numbers (size, mean, std) come from the model's saved ViTImageProcessor config, so a model
pushed to the Hub also works with `transformers.pipeline("image-classification")`; this module
only does the same work without the processor's per-image copies (tests/test_preprocess.py
checks that both agree).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class PixelSpec:
    """What a model expects: square side in pixels and per-channel normalisation."""

    size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @classmethod
    def from_processor(cls, processor) -> "PixelSpec":
        size = processor.size
        side = size["height"] if "height" in size else size["shortest_edge"]
        return cls(size=int(side), mean=tuple(processor.image_mean), std=tuple(processor.image_std))

    def processor(self):
        """The Hub-compatible processor saved beside the weights."""
        from transformers import ViTImageProcessorPil

        return ViTImageProcessorPil(
            size={"height": self.size, "width": self.size},
            image_mean=list(self.mean),
            image_std=list(self.std),
        )


def resize_gray(image: Image.Image, size: int) -> Image.Image:
    """Square resize, aspect ratio not kept, bilinear with antialiasing: exactly what ViTImageProcessorPil
    does (no `reducing_gap` shortcut, which made large originals differ by up to ~20 grey levels)."""
    if image.size == (size, size):
        return image
    return image.resize((size, size), Image.Resampling.BILINEAR)


def pixel_values(images: Sequence[Image.Image], spec: PixelSpec) -> torch.Tensor:
    """Stack grayscale images (any size) into a normalised float tensor (N, 3, size, size)."""
    batch = np.stack([np.asarray(resize_gray(image, spec.size), dtype=np.uint8) for image in images])
    gray = torch.from_numpy(batch).unsqueeze(1).float().div_(255.0)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    # The three channels are the same gray values, normalised per channel like an RGB image.
    return (gray - mean) / std
