"""One forward pass that yields what the app shows: probabilities, the classifier's input feature
(for the out-of-domain check) and an attention-rollout heatmap.

Why attention rollout (Abnar & Zuidema 2020) and not Grad-CAM:
- It needs no backward pass: the heatmap comes from the same forward that gives the prediction
  (with `output_attentions=True`, which needs the "eager" attention kernel), so it costs almost
  nothing on a 2-vCPU Space and runs under `torch.inference_mode`.
- Grad-CAM was designed for convolutional feature maps; on a ViT one must pick a token layer and
  reshape it, and its gradients through the final LayerNorm of a small from-scratch model are noisy.
- Limitation, stated in the app: rollout shows where the [CLS] token gathers information from, for
  both classes alike; it is not evidence *for* pneumonia. At 128 px with 16 px patches the map is
  8x8 cells, so it localises at the level of a lung zone at best.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass
class ForwardResult:
    probabilities: np.ndarray  # (N, classes), softmax of the logits
    features: np.ndarray  # (N, hidden): what the classification head sees (final [CLS] after LayerNorm)
    attentions: tuple[torch.Tensor, ...] | None  # per layer (N, heads, tokens, tokens)


@contextmanager
def head_input(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collects the input of the model's `classifier` head at each forward inside the block.

    The hook keeps this independent of how a given architecture pools its tokens: whatever the
    head receives is the embedding the out-of-domain statistics are fitted on. The same capture
    runs in `forward` and in the fast path's ONNX export (pneumonia_vit/fast_inference.py).
    """
    captured: list[torch.Tensor] = []
    handle = model.classifier.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        yield captured
    finally:
        handle.remove()


@torch.inference_mode()
def forward(model: torch.nn.Module, pixel_values: torch.Tensor, output_attentions: bool = False) -> ForwardResult:
    """Runs the classifier once and captures the input of its `classifier` head (`head_input`)."""
    with head_input(model) as captured:
        device = next(model.parameters()).device
        output = model(pixel_values=pixel_values.to(device), output_attentions=output_attentions)
    attentions = output.attentions if output_attentions else None
    if output_attentions and not attentions:
        raise RuntimeError(
            "the model returned no attention weights: load it with attn_implementation='eager' "
            "(or call model.set_attn_implementation('eager'))"
        )
    return ForwardResult(
        probabilities=output.logits.float().softmax(dim=-1).cpu().numpy(),
        features=captured[0].float().cpu().numpy(),
        attentions=attentions,
    )


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
