"""The model as the app and predict.py serve it: one file in, probabilities, the decision at the
model's stored threshold, an out-of-domain verdict and (for the app) a heatmap out.

No gradio here: predict.py and `python -m pneumonia_vit.domain` use this module without the
seconds that importing gradio takes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image

from .domain import DomainCheck, DomainStats, check_domain
from .explain import attention_rollout, forward, overlay
from .images import LABELS, XrayReading, read_xray
from .model import Classifier
from .preprocess import pixel_values

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "models" / "pneumonia-vit-tiny"
PREVIEW_SIDE = 512  # the preview and heatmap the page shows, long side in pixels


def model_id_from_env() -> str:
    """$MODEL_ID (a Hub id or a local folder), else the bundled model."""
    return os.environ.get("MODEL_ID") or str(DEFAULT_MODEL)


@dataclass
class Analysis:
    probabilities: dict[str, float]  # {"NORMAL": p, "PNEUMONIA": 1 - p}
    decision: str  # the label at the model's stored threshold
    threshold: float
    domain: DomainCheck
    preview: Image.Image | None = None  # the X-ray as the model reads it, long side <= PREVIEW_SIDE
    heatmap: Image.Image | None = None  # attention rollout over the preview

    @property
    def p_pneumonia(self) -> float:
        return self.probabilities["PNEUMONIA"]


class Service:
    """A loaded classifier plus its out-of-domain statistics (None: rules 1-2 only)."""

    def __init__(self, classifier: Classifier, domain_stats: DomainStats | None, model_id: str = ""):
        labels = tuple(classifier.model.config.id2label[i] for i in range(len(classifier.model.config.id2label)))
        if labels != LABELS:
            raise ValueError(f"{model_id}: model labels are {labels}; this app expects {LABELS}")
        # Attention rollout reads the attention weights, which only the eager kernel returns.
        classifier.model.set_attn_implementation("eager")
        self.classifier = classifier
        self.domain_stats = domain_stats
        self.model_id = model_id

    @classmethod
    def load(cls, model_id: str | None = None) -> "Service":
        model_id = str(model_id or model_id_from_env())
        if not Path(model_id).is_dir() and (model_id.startswith((".", "/")) or model_id.count("/") != 1):
            raise FileNotFoundError(
                f"model {model_id!r} not found: give MODEL_ID as a local folder or a Hub id (owner/name)"
            )
        # fast=False: the PyTorch fp32 model, not the ONNX int8 fast path. One forward of it gives the
        # probabilities, the head-input features (domain check) and the attention weights (heatmap);
        # the fast path returns logits only, so it would add a second forward rather than save one,
        # and its probabilities differ (by ~1e-3) from the fp32 ones the threshold was chosen on.
        return cls(Classifier.load(model_id, fast=False), DomainStats.load(model_id), model_id)

    @property
    def threshold(self) -> float:
        return self.classifier.threshold

    def decide(self, p_pneumonia: float) -> str:
        return LABELS[1] if p_pneumonia >= self.threshold else LABELS[0]

    def _analyses(self, readings: Sequence[XrayReading], explain: bool) -> list[Analysis]:
        spec = self.classifier.spec
        result = forward(self.classifier.model, pixel_values([r.image for r in readings], spec), output_attentions=explain)
        grid = spec.size // self.classifier.model.config.patch_size if explain else 0
        analyses = []
        for index, reading in enumerate(readings):
            p_pneumonia = float(result.probabilities[index, 1])
            analysis = Analysis(
                probabilities={LABELS[0]: 1.0 - p_pneumonia, LABELS[1]: p_pneumonia},
                decision=self.decide(p_pneumonia),
                threshold=self.threshold,
                domain=check_domain(reading, result.features[index : index + 1], self.domain_stats),
            )
            if explain:
                preview = reading.image.copy()
                preview.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE), Image.Resampling.BILINEAR)
                analysis.preview = preview
                analysis.heatmap = overlay(reading.image, attention_rollout(result.attentions, grid, index), PREVIEW_SIDE)
            analyses.append(analysis)
        return analyses

    def analyze(self, source, explain: bool = True) -> Analysis:
        """One file (path, bytes or PIL image); raises InvalidImageError for unusable input.

        No JPEG draft decoding: the colour check needs the file's colour, and a full decode keeps
        the grey image identical to `load_xray(path)`.
        """
        return self._analyses([read_xray(source)], explain)[0]

    def analyze_many(self, readings: Sequence[XrayReading], batch_size: int = 32) -> list[Analysis]:
        """Batched scoring without heatmaps (predict.py)."""
        analyses: list[Analysis] = []
        for start in range(0, len(readings), batch_size):
            analyses.extend(self._analyses(readings[start : start + batch_size], explain=False))
        return analyses
