"""The model as the app and predict.py serve it: one file in; probabilities, the out-of-domain verdict,
the decision at the model's stored threshold where the verdict allows one and, for the page, a heatmap out.

Each image is scored in a forward of its own: the fast path scales int8 activations per forward, so
batch-mates could move an answer across the threshold; alone, an answer depends on its file only,
whichever endpoint, batch or client it came through. No gradio here (predict.py need not import it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..images import LABELS, InvalidImageError, XrayReading, read_xray, release_freed_memory
from ..inference.backends import forward
from ..inference.classifier import Classifier
from ..ood.check import CHECK_FILE, STATS_FILE, DomainCheck, DomainStats, KindModel, check_domain
from ..preprocess import pixel_values
from .heatmap import attention_rollout, overlay

# The checkout the package runs from: a Space runs app.py beside the package and `pip install -e .`
# installs it in place, so the bundled model is two folders up (a wheel install must name its model).
REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO / "models" / "pneumonia-vit-tiny"
PREVIEW_SIDE = 512  # the preview and heatmap the page shows, long side in pixels
FILE_WORKERS = 2  # files read and scored at once by analyze_files: the 2 vCPUs of a basic Space
TRIM_EVERY_S = 5.0  # freed memory handed back at most this often: glibc's arenas creep under crowds
ADVICE = "upload a frontal chest X-ray of a child aged 1-5, whole, upright and in grey"
FORMS = ("predict", "assess", "batch", "csv")

log = logging.getLogger("pneumonia_vit.serving")


class OutOfDomainError(ValueError):
    """/predict's refusal: the message is `Analysis.refusal`."""


@dataclass
class Analysis:
    probabilities: dict[str, float]  # {"NORMAL": p, "PNEUMONIA": 1 - p}
    threshold: float
    domain: DomainCheck
    preview: Image.Image | None = None  # the X-ray as the model reads it, long side <= PREVIEW_SIDE
    heatmap: Image.Image | None = None  # attention rollout over the preview

    @property
    def p_pneumonia(self) -> float:
        return self.probabilities["PNEUMONIA"]

    @property
    def decision(self) -> str | None:
        """The label at the model's stored threshold; None outside the domain: no diagnosis there."""
        if not self.domain.in_domain:
            return None
        return LABELS[1] if self.p_pneumonia >= self.threshold else LABELS[0]

    @property
    def refusal(self) -> str | None:
        """Why no diagnosis is given, in plain words, and what to do (None inside the domain)."""
        if self.domain.in_domain:
            return None
        reasons = "; ".join(self.domain.reasons)
        return f"Out of domain: {reasons[0].upper() + reasons[1:]}. No diagnosis is given for this image: {ADVICE}."

    def answer(self, form: str) -> dict:
        """The answer in the form of a way in, one of FORMS: an endpoint's (README.md's API section) or predict.py's
        columns ("csv"). "predict", gradio's Label value, raises OutOfDomainError outside the domain."""
        confidences = [{"label": name, "confidence": round(p, 6)}
                       for name, p in sorted(self.probabilities.items(), key=lambda item: item[1], reverse=True)]
        if form == "predict":
            if self.decision is None:
                raise OutOfDomainError(self.refusal)
            return {"label": self.decision, "confidences": confidences}
        if form == "batch":
            if self.decision is None:
                return {"error": self.refusal, "error_kind": "out_of_domain", "domain": self.domain.verdict()}
            return {"label": self.decision, "confidences": confidences, "domain": self.domain.verdict()}
        if form == "assess":
            return {
                "decision": self.decision,
                "decision_applicable": self.decision is not None,
                "probabilities": {name: round(p, 6) for name, p in self.probabilities.items()},
                "probabilities_reliable": self.domain.in_domain,
                "threshold": self.threshold,
                "warning": self.refusal,
                "domain": self.domain.verdict(),
            }
        if form == "csv":
            return {"p_normal": f"{self.probabilities[LABELS[0]]:.6f}", "p_pneumonia": f"{self.p_pneumonia:.6f}",
                    "decision": self.decision or "", "out_of_domain": "; ".join(self.domain.reasons)}
        raise ValueError(f"unknown form {form!r}: one of {FORMS}")


class Service:
    """A loaded classifier plus the out-of-domain rules (pneumonia_vit/ood/check.py): `kind_model` and
    `domain_stats`, each None where it cannot run; `check_notes` says, in plain words, which checks are
    off or borrowed (logged at start-up by `load`, shown on the page).

    `classifier` scores (fast path by default); `explainer`, the fp32 PyTorch model with eager
    attention, makes heatmaps (None unless loaded with explain=True; the same object as
    `classifier.model` when the classifier itself is the PyTorch model).
    """

    def __init__(self, classifier: Classifier, domain_stats: DomainStats | None, model_id: str = "",
                 explain: bool = False, kind_model: KindModel | None = None, check_notes: Sequence[str] = ()):
        labels = tuple(classifier.labels or ())
        if labels != LABELS:
            raise ValueError(f"{model_id}: model labels are {labels}; this app expects {LABELS}")
        self.classifier = classifier
        self.explainer = None
        if explain:
            # Attention rollout reads the attention weights, which only the eager kernel returns.
            self.explainer = classifier.model
            self.explainer.set_attn_implementation("eager")
        self.domain_stats = domain_stats
        self.kind_model = kind_model
        self.check_notes = list(check_notes)
        self._trimmed = time.monotonic()
        if kind_model is None:
            self.check_notes.append(f"image-kind check off: no {CHECK_FILE} (adult, altered and non-X-ray inputs "
                                    "are caught only by the other checks)")
        if domain_stats is None:
            self.check_notes.append(f"feature-distance check off: the model folder has no {STATS_FILE}")
        self.model_id = model_id

    @classmethod
    def load(cls, model_id: str | Path | None = None, explain: bool = False, fast: bool = True,
             cache: str | Path | None = None, threads: int | None = None) -> Service:
        """`model_id`: None serves the bundled model. `explain`: also load the PyTorch model for heatmaps,
        now (the app; predict.py needs none). The rest: `Classifier.load`.

        The kind model does not depend on the classifier: a folder without one (a train_vit.py run) is
        checked with the bundled model's."""
        model_id = str(model_id or DEFAULT_MODEL)
        if not Path(model_id).is_dir() and (model_id.startswith((".", "/")) or model_id.count("/") != 1):
            raise FileNotFoundError(
                f"model {model_id!r} not found: give MODEL_ID as a local folder or a Hub id (owner/name)"
            )
        classifier = Classifier.load(model_id, fast=fast, cache=cache, threads=threads, keep_model=explain)
        kind_model, notes = KindModel.load(model_id), []
        if kind_model is None and (DEFAULT_MODEL / CHECK_FILE).is_file():
            kind_model = KindModel.load(DEFAULT_MODEL)
            notes.append(f"image-kind check: the bundled model's (this model folder has no {CHECK_FILE} of its own)")
        service = cls(classifier, DomainStats.load(model_id), model_id, explain=explain, kind_model=kind_model,
                      check_notes=notes)
        for note in service.check_notes:
            log.warning("%s: %s", model_id, note)
        return service

    @property
    def backend(self) -> str:
        return self.classifier.backend.name

    @property
    def threshold(self) -> float:
        return self.classifier.threshold

    def _score(self, reading: XrayReading) -> Analysis:
        probabilities, features = self.classifier.probabilities_and_features([reading.image])
        p = float(probabilities[0, 1])
        if time.monotonic() - self._trimmed > TRIM_EVERY_S:
            self._trimmed = time.monotonic()
            release_freed_memory()
        return Analysis(probabilities={LABELS[0]: 1.0 - p, LABELS[1]: p}, threshold=self.threshold,
                        domain=check_domain(reading, features, self.domain_stats, self.kind_model,
                                            min_side=self.classifier.spec.size))

    def _explain(self, reading: XrayReading, analysis: Analysis) -> Analysis:
        """`analysis` with the preview and the heatmap of the eager fp32 model."""
        if self.explainer is None:
            raise RuntimeError("this Service was loaded without the explaining model: Service.load(..., explain=True)")
        spec = self.classifier.spec
        result = forward(self.explainer, pixel_values([reading.image], spec), output_attentions=True)
        analysis.preview = reading.image.copy()
        analysis.preview.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE), Image.Resampling.BILINEAR)
        grid = spec.size // self.explainer.config.patch_size
        analysis.heatmap = overlay(reading.image, attention_rollout(result.attentions, grid, 0), PREVIEW_SIDE)
        return analysis

    def analyze(self, source, explain: bool = True) -> Analysis:
        """One file (path, bytes or PIL image); raises InvalidImageError for unusable input.
        explain=True adds the page's preview and heatmap; the numbers are the scoring model's either way."""
        reading = read_xray(source)
        analysis = self._score(reading)
        return self._explain(reading, analysis) if explain else analysis

    def analyze_files(self, sources: Sequence) -> list[Analysis | InvalidImageError]:
        """Each file's analysis without heatmap, or the InvalidImageError that says why it cannot be read, in
        order: one bad file fails alone. FILE_WORKERS at a time: decoding releases the GIL and costs as much as
        the scoring."""

        def one(source) -> Analysis | InvalidImageError:
            try:
                return self._score(read_xray(source))
            except InvalidImageError as error:
                return error

        with ThreadPoolExecutor(FILE_WORKERS) as pool:
            return list(pool.map(one, sources))
