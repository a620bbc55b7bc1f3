"""The attention-rollout heatmap (Abnar & Zuidema 2020) the page shows over the X-ray.

Why rollout and not Grad-CAM: it needs no backward pass, only the attention weights of a forward
(`output_attentions=True`, eager kernel), so it is cheap on a 2-vCPU Space; Grad-CAM was designed for
convolutional feature maps, and its gradients through a small from-scratch ViT's final LayerNorm are noisy.
Its limit, stated on the page: it shows where the [CLS] token gathers information from, for both classes
alike, not evidence *for* pneumonia, and only at the resolution of the patch grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


def attention_rollout(attentions: Sequence[torch.Tensor], grid: int, index: int = 0, residual: float = 0.5) -> np.ndarray:
    """How much each patch feeds the [CLS] token through all layers: a (grid, grid) map in [0, 1].

    Each layer's attention is averaged over heads, mixed with the identity for the residual
    connection (weight `residual`), re-normalised and multiplied through the layers.
    """
    tokens = attentions[0].shape[-1]
    special = tokens - grid * grid  # 1 for ViT ([CLS]); 2 for DeiT ([CLS] + distillation)
    if special < 1:
        raise ValueError(f"{tokens} tokens do not fit a {grid}x{grid} patch grid")
    identity = torch.eye(tokens)
    rollout = identity.clone()
    for layer in attentions:
        mixed = residual * identity + (1.0 - residual) * layer[index].float().cpu().mean(dim=0)
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        rollout = mixed @ rollout
    flow = rollout[0, special:].reshape(grid, grid).numpy()
    low, high = float(flow.min()), float(flow.max())
    return (flow - low) / (high - low) if high > low else np.zeros_like(flow)


def _colormap() -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps["inferno"](np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)


_LUT: np.ndarray | None = None


def overlay(gray: Image.Image, heat: np.ndarray, max_side: int = 512, alpha: float = 0.45) -> Image.Image:
    """The heatmap, stretched over the whole X-ray (the model sees it square-resized, so each cell
    covers the same fraction of the width and height), blended over a copy at most `max_side` wide."""
    global _LUT
    if _LUT is None:
        _LUT = _colormap()
    base = gray.copy()
    base.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    cells = Image.fromarray(np.round(heat * 255).astype(np.uint8), mode="L")
    smooth = np.asarray(cells.resize(base.size, Image.Resampling.BICUBIC))
    coloured = _LUT[smooth].astype(np.float32)
    grey = np.asarray(base.convert("RGB"), dtype=np.float32)
    # Stronger colour where attention is high, so low-attention areas stay readable as an X-ray.
    weight = alpha * (0.35 + 0.65 * smooth[..., None] / 255.0)
    blended = grey * (1.0 - weight) + coloured * weight
    return Image.fromarray(np.clip(np.round(blended), 0, 255).astype(np.uint8), mode="RGB")
