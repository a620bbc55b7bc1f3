"""The model as the app and predict.py serve it: one file in, probabilities, the decision at the
model's stored threshold, an out-of-domain verdict and (for the app) a heatmap out.

Two models, one of each loaded once:
- scoring (the API's /predict, predict.py, `analyze(..., explain=False)`): `Classifier.load`'s
  default, the fast path (ONNX Runtime, int8 weights; pneumonia_vit/inference/fast_path.py). One forward
  gives the logits and the head-input features the out-of-domain check reads. PNEUMONIA_VIT_FAST=0
  scores with the fp32 PyTorch model instead.
- explaining (the page's /analyze, `analyze(..., explain=True)`, only with `Service.load(...,
  explain=True)`): the fp32 PyTorch model with the eager attention kernel, whose attention weights
  the heatmap is made of. Its probabilities and features come from the same forward, so the page's
  numbers are those of the model the heatmap explains; they differ from the fast path's by ~1e-3
  (the same model with PNEUMONIA_VIT_FAST=0). Every decision is taken at the stored threshold.

With `max_batch` > 1, `predict` (the API) scores concurrent requests together in one forward
(pneumonia_vit/serving/batching.py); each request still decodes and checks its own file first.

No gradio here: predict.py and `python -m benchmarks.domain_check` use this module without
the seconds that importing gradio takes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..images import LABELS, XrayReading, read_xray
from ..inference.backends import forward
from ..inference.classifier import Classifier
from ..ood.check import DomainCheck, DomainStats, KindModel, check_domain
from ..preprocess import pixel_values
from .batching import MicroBatcher
from .heatmap import attention_rollout, overlay

# The checkout the package runs from: a Space runs app.py beside the package and `pip install -e .`
# installs it in place, so the bundled model is one folder up (a wheel install must name its model).
REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "models" / "pneumonia-vit-tiny"
PREVIEW_SIDE = 512  # the preview and heatmap the page shows, long side in pixels
BATCH_WORKERS = 2  # forwards at once: the 2 vCPUs of a basic Space (pneumonia_vit/serving/batching.py)


@dataclass
class Analysis:
    probabilities: dict[str, float]  # {"NORMAL": p, "PNEUMONIA": 1 - p}
    decision: str  # the label at the model's stored threshold
    threshold: float
    domain: DomainCheck
    preview: Image.Image | None = None  # the X-ray as the model reads it, long side <= PREVIEW_SIDE
    heatmap: Image.Image | None = None  # attention rollout over the preview
    batch_size: int = 1  # how many images shared the forward that scored this one

    @property
    def p_pneumonia(self) -> float:
        return self.probabilities["PNEUMONIA"]


class Service:
    """A loaded classifier plus the out-of-domain rules its folder carries (pneumonia_vit/ood/check.py):
    `kind_model` (rule 3) and `domain_stats` (rule 4), each None where the folder has no file for it.

    `classifier` scores (fast path by default); `explainer`, the fp32 PyTorch model with eager
    attention, makes heatmaps (None unless loaded with explain=True; the same object as
    `classifier.model` when the classifier itself is the PyTorch model).
    """

    def __init__(self, classifier: Classifier, domain_stats: DomainStats | None, model_id: str = "",
                 explain: bool = False, max_batch: int = 1, batch_workers: int = BATCH_WORKERS,
                 kind_model: KindModel | None = None):
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
        self.model_id = model_id
        self.max_batch = max_batch
        self.batcher = (MicroBatcher(self._score, max_batch, workers=batch_workers, name="predict-batcher")
                        if max_batch > 1 else None)

    @classmethod
    def load(cls, model_id: str | Path | None = None, explain: bool = False, max_batch: int = 1,
             fast: bool = True, cache: str | Path | None = None, threads: int | None = None) -> Service:
        """`model_id`: None serves the bundled model. `explain`: also load the PyTorch model for heatmaps,
        now (the app; predict.py needs none). `max_batch`: see `predict`. The rest: `Classifier.load`."""
        model_id = str(model_id or DEFAULT_MODEL)
        if not Path(model_id).is_dir() and (model_id.startswith((".", "/")) or model_id.count("/") != 1):
            raise FileNotFoundError(
                f"model {model_id!r} not found: give MODEL_ID as a local folder or a Hub id (owner/name)"
            )
        classifier = Classifier.load(model_id, fast=fast, cache=cache, threads=threads, keep_model=explain)
        return cls(classifier, DomainStats.load(model_id), model_id, explain=explain, max_batch=max_batch,
                   kind_model=KindModel.load(model_id))

    @property
    def backend(self) -> str:
        return self.classifier.backend.name

    @property
    def threshold(self) -> float:
        return self.classifier.threshold

    def decide(self, p_pneumonia: float) -> str:
        return LABELS[1] if p_pneumonia >= self.threshold else LABELS[0]

    def _analysis(self, reading: XrayReading, p_pneumonia: float, features, batch_size: int) -> Analysis:
        return Analysis(
            probabilities={LABELS[0]: 1.0 - p_pneumonia, LABELS[1]: p_pneumonia},
            decision=self.decide(p_pneumonia),
            threshold=self.threshold,
            domain=check_domain(reading, features, self.domain_stats, self.kind_model),
            batch_size=batch_size,
        )

    def _score(self, readings: Sequence[XrayReading]) -> list[Analysis]:
        """Probabilities and domain checks of a batch, through the scoring model (no heatmaps)."""
        probabilities, features = self.classifier.probabilities_and_features([reading.image for reading in readings])
        return [
            self._analysis(reading, float(probabilities[i, 1]),
                           features[i : i + 1] if features is not None else None, len(readings))
            for i, reading in enumerate(readings)
        ]

    def _explain(self, reading: XrayReading) -> Analysis:
        """Probabilities, domain check and heatmap from one forward of the eager fp32 model."""
        if self.explainer is None:
            raise RuntimeError("this Service was loaded without the explaining model: Service.load(..., explain=True)")
        spec = self.classifier.spec
        result = forward(self.explainer, pixel_values([reading.image], spec), output_attentions=True)
        analysis = self._analysis(reading, float(result.probabilities[0, 1]), result.features[0:1], 1)
        preview = reading.image.copy()
        preview.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE), Image.Resampling.BILINEAR)
        analysis.preview = preview
        grid = spec.size // self.explainer.config.patch_size
        analysis.heatmap = overlay(reading.image, attention_rollout(result.attentions, grid, 0), PREVIEW_SIDE)
        return analysis

    def analyze(self, source, explain: bool = True) -> Analysis:
        """One file (path, bytes or PIL image); raises InvalidImageError for unusable input.

        explain=True: the page's analysis with a heatmap (fp32 PyTorch model); explain=False: scored
        by the scoring model, alone (no batching).

        No JPEG draft decoding: the colour check needs the file's colour, and a full decode keeps
        the grey image identical to `load_xray(path)`.
        """
        reading = read_xray(source)
        return self._explain(reading) if explain else self._score([reading])[0]

    def predict(self, source) -> Analysis:
        """`analyze(source, explain=False)` for the API: the file is decoded in the calling thread (an
        unusable one raises InvalidImageError there, to this caller only), then, with `max_batch` > 1,
        scored in one forward with the other requests waiting at that moment. With the fast path an
        image's probability moves by ~1e-3 with its batch companions (int8 activations are scaled per
        batch); alone it is exactly `Classifier.pneumonia_probability([image])`."""
        if self.batcher is None:
            return self.analyze(source, explain=False)
        analysis, _ = self.batcher.run(lambda: read_xray(source))
        return analysis

    def analyze_many(self, readings: Sequence[XrayReading], batch_size: int = 32) -> list[Analysis]:
        """Batched scoring without heatmaps (predict.py)."""
        analyses: list[Analysis] = []
        for start in range(0, len(readings), batch_size):
            analyses.extend(self._score(readings[start : start + batch_size]))
        return analyses
