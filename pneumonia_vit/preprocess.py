"""Grayscale X-ray -> model input, the same for training, evaluation and the app: what the model's saved
ViTImageProcessor does (so the Hub's `pipeline("image-classification")` agrees), without its per-image copies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
    def from_settings(cls, size: dict, image_mean, image_std) -> PixelSpec:
        """From a ViTImageProcessor's `size`, `image_mean` and `image_std` (object or saved JSON)."""
        side = size["height"] if "height" in size else size["shortest_edge"]
        if "height" in size and size["width"] != side:
            raise ValueError(f"non-square input size {size}: this project resizes to squares")
        return cls(size=int(side), mean=tuple(float(v) for v in image_mean), std=tuple(float(v) for v in image_std))

    @classmethod
    def from_processor(cls, processor) -> PixelSpec:
        return cls.from_settings(processor.size, processor.image_mean, processor.image_std)

    def processor(self):
        """The Hub-compatible processor saved beside the weights."""
        from transformers import ViTImageProcessorPil

        return ViTImageProcessorPil(size={"height": self.size, "width": self.size}, image_mean=list(self.mean),
                                    image_std=list(self.std))


def resize_gray(image: Image.Image, size: int) -> Image.Image:
    """Square resize, aspect ratio not kept, bilinear with antialiasing: exactly what ViTImageProcessorPil
    does (no `reducing_gap` shortcut: it changes large originals' pixels)."""
    if image.size == (size, size):
        return image
    return image.resize((size, size), Image.Resampling.BILINEAR)


def pixel_array(images: Sequence[Image.Image], spec: PixelSpec) -> np.ndarray:
    """Grayscale images (any size) as normalised float32 pixel values (N, 3, size, size): the grey values in each
    channel, normalised like an RGB channel, every output value written once (ONNX Runtime takes it as it is)."""
    gray = np.stack([np.asarray(resize_gray(image, spec.size), dtype=np.uint8) for image in images])
    out = np.empty((len(images), 3, spec.size, spec.size), dtype=np.float32)
    for channel in range(3):
        if channel and (spec.mean[channel], spec.std[channel]) == (spec.mean[0], spec.std[0]):
            out[:, channel] = out[:, 0]
            continue
        # ((g / 255) - mean) / std  ==  g * (1 / (255 std)) - mean / std
        np.multiply(gray, np.float32(1.0 / (255.0 * spec.std[channel])), out=out[:, channel], dtype=np.float32)
        out[:, channel] -= np.float32(spec.mean[channel] / spec.std[channel])
    return out


def pixel_values(images: Sequence[Image.Image], spec: PixelSpec) -> torch.Tensor:
    """`pixel_array` as a torch tensor, for the PyTorch model."""
    return torch.from_numpy(pixel_array(images, spec))
