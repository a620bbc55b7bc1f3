"""What a `Classifier` runs: a backend turns pixel values (N, 3, size, size) into logits (N, classes) and the
classification head's input features (N, hidden; None where it cannot give them). `TorchBackend` here runs the fp32
PyTorch model, `fast_path.OnnxBackend` ONNX Runtime with int8 weights."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


class Backend(Protocol):
    name: str  # what the logs and the benchmarks call it, such as "torch-fp32"

    def run(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]: ...


@dataclass
class ForwardResult:
    logits: np.ndarray  # (N, classes)
    features: np.ndarray  # (N, hidden): what the classification head sees (final [CLS] after LayerNorm)
    attentions: tuple[torch.Tensor, ...] | None  # per layer (N, heads, tokens, tokens)


def classification_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The head whose input the out-of-domain check reads: `classifier`, or the [CLS] head of a DeiT with a
    distillation token (its other head reads the distillation token); None for models with neither."""
    for name in ("classifier", "cls_classifier"):
        head = getattr(model, name, None)
        if head is not None:
            return head
    return None


@contextmanager
def head_input(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collects the input of the model's classification head at each forward inside the block, as (N, features)
    (a CNN's head reads (N, C, 1, 1)): a hook, so that whatever the head receives, however an architecture pools
    its tokens, is what the out-of-domain check reads, on every backend."""
    captured: list[torch.Tensor] = []
    handle = classification_head(model).register_forward_pre_hook(lambda module, args: captured.append(args[0].flatten(1)))
    try:
        yield captured
    finally:
        handle.remove()


@torch.inference_mode()
def forward(model: torch.nn.Module, pixel_values: torch.Tensor, output_attentions: bool = False) -> ForwardResult:
    """Runs the classifier once and captures the input of its classification head (`head_input`)."""
    with head_input(model) as captured:
        device = next(model.parameters()).device
        output = model(pixel_values=pixel_values.to(device), output_attentions=output_attentions)
    attentions = output.attentions if output_attentions else None
    if output_attentions and not attentions:
        raise RuntimeError("the model returned no attention weights: load it with attn_implementation='eager' "
                           "(or call model.set_attn_implementation('eager'))")
    return ForwardResult(
        logits=output.logits.float().cpu().numpy(),
        features=captured[0].float().cpu().numpy(),
        attentions=attentions,
    )


class TorchBackend:
    name = "torch-fp32"

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def run(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        result = forward(self.model, torch.from_numpy(pixels))
        return result.logits, result.features
