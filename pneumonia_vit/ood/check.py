"""The out-of-domain check run at serving: does an input look like the pediatric chest X-rays the model
learned from? docs/out_of_domain.md gives the design and the reason for each choice.

A flagged input is still scored, marked unreliable, but no way in gives a decision for it (serving/service.py).
The rules (RULES), each with the reason it gives:
- resolution: the short side below the model's input side (`min_side`): the film would be upscaled to be read;
- transparency: more than MAX_TRANSPARENCY of the pixels not opaque: what they hid is unknown;
1. colour: the file's mean chroma (XrayReading.chroma) above MAX_CHROMA: a radiograph carries no colour;
2. blank: a grey-level standard deviation below MIN_STD;
3. kind: P(pediatric chest X-ray) from the KindModel, a tiny CNN of its own (CHECK_FILE, fitted by ood/fit.py),
   below its cut-off; where the classifier's DomainStats hold a child score set with this kind model, the
   combined `kind_score` below its cut-off instead (two opinions that err on different images);
4. features: the Mahalanobis distance of the classifier's [CLS] features to its training set's, above a
   validation quantile (STATS_FILE, fitted at the end of training).
A model folder without either file is served with the rules it has.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..images import XrayReading

STATS_FILE = "domain_stats.safetensors"
STATS_FORMAT = "pneumonia_vit.domain/1"
CHECK_FILE = "domain_check.safetensors"
CHECK_FORMAT = "pneumonia_vit.domain_check/2"  # /1 was a multilayer perceptron on thumbnail statistics
MAX_CHROMA = 6.0  # grey levels; JPEG noise on a grey RGB file stays below 1
MIN_STD = 10.0  # grey levels, on 0..255
MAX_TRANSPARENCY = 0.01  # fraction of pixels with alpha < 255 above which a file is refused
CHECK_SIDE = 64
CHECK_INPUTS = f"grey{CHECK_SIDE}x{CHECK_SIDE}-standardised"  # saved with the model, checked on load

# What the kind model tells apart (its output order) and how the app says each in plain words.
PEDIATRIC = "pediatric_chest_xray"
KINDS = (PEDIATRIC, "adult_chest_xray", "altered_chest_film", "not_an_xray")
LOOKS_LIKE = {
    "adult_chest_xray": "it looks like an adult chest X-ray; this model only knows children aged 1-5",
    "altered_chest_film": "it looks like a chest film that is rotated, inverted (a negative) or cropped; "
                          "the model only knows whole frontal films, upright, with bones bright",
    "not_an_xray": "it does not look like an X-ray (a photo, document, drawing, chart or other image)",
}
COLOUR, BLANK, UNFAMILIAR = "colour_image", "blank_image", "unfamiliar_to_the_model"
LOW_RESOLUTION, TRANSPARENT = "low_resolution", "transparent_image"
RULES = ("resolution", "transparency", "colour", "blank", "kind", "features")


def _refit(what: str) -> str:
    return f"refit it (python -m pneumonia_vit.ood.fit MODEL_DIR --data_dir DATA --adult_dir ADULTS --{what})"


def _read_safetensors(path: str | Path, expected_format: str, fitted_by: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != expected_format:
            raise ValueError(f"{path}: not a {expected_format} file (format {metadata.get('format')!r}): {_refit(fitted_by)}")
        return {name: handle.get_tensor(name) for name in handle.keys()}, metadata


def _write_safetensors(folder: str | Path, name: str, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> Path:
    from safetensors.numpy import save_file

    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata)
    return path


def _model_file(model_id: str | Path, name: str) -> str | None:
    """`name` beside a model (a local folder or a Hub id), or None where there is none."""
    folder = Path(model_id)
    if folder.is_dir():
        return str(folder / name) if (folder / name).is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(str(model_id), name)
    except Exception:  # no such file in the repo, offline, private repo: serve without this rule
        return None


@dataclass
class DomainStats:
    """Gaussian model of the training embeddings and the distance beyond which an input is flagged."""

    mean: np.ndarray  # (hidden,)
    precision: np.ndarray  # (hidden, hidden), inverse of the shrunk covariance
    threshold: float  # Mahalanobis distance cut-off
    quantile: float  # the validation quantile the cut-off was taken at
    train_count: int
    validation_count: int
    # Rule 3's second opinion (ood/fit.py: fit_child_score), absent where not fitted.
    child_weight: np.ndarray | None = None  # (hidden,)
    child_bias: float = 0.0
    kind_cutoff: float | None = None  # flag where logit P(pediatric) + child_score is below this
    kind_model_fingerprint: str = ""  # the kind model that cut-off was set with

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row of `features` (N, hidden) to the training mean."""
        centred = np.atleast_2d(np.asarray(features, dtype=np.float64)) - self.mean
        squared = np.einsum("nd,de,ne->n", centred, self.precision, centred)
        return np.sqrt(np.maximum(squared, 0.0))

    def child_score(self, features: np.ndarray) -> np.ndarray:
        """The features' evidence for a pediatric chest film (a logit), one per row of `features`."""
        return np.atleast_2d(np.asarray(features, dtype=np.float64)) @ self.child_weight + self.child_bias

    def combines_with(self, kind_model: KindModel | None) -> bool:
        """Whether rule 3 adds child_score to `kind_model`'s: only to the kind model its cut-off was set with."""
        return (self.child_weight is not None and kind_model is not None
                and kind_model.fingerprint == self.kind_model_fingerprint)

    def save(self, folder: str | Path) -> Path:
        metadata = {
            "format": STATS_FORMAT, "threshold": repr(self.threshold), "quantile": repr(self.quantile),
            "train_count": str(self.train_count), "validation_count": str(self.validation_count),
        }
        tensors = {"mean": self.mean.astype(np.float64), "precision": self.precision.astype(np.float64)}
        if self.child_weight is not None:
            tensors["child_weight"] = self.child_weight.astype(np.float64)
            metadata.update(child_bias=repr(self.child_bias), kind_cutoff=repr(self.kind_cutoff),
                            kind_model_fingerprint=self.kind_model_fingerprint)
        return _write_safetensors(folder, STATS_FILE, tensors, metadata)

    @classmethod
    def read(cls, path: str | Path) -> DomainStats:
        tensors, metadata = _read_safetensors(path, STATS_FORMAT, fitted_by="feature_stats")
        return cls(mean=tensors["mean"], precision=tensors["precision"], threshold=float(metadata["threshold"]),
                   quantile=float(metadata["quantile"]), train_count=int(metadata["train_count"]),
                   validation_count=int(metadata["validation_count"]), child_weight=tensors.get("child_weight"),
                   child_bias=float(metadata.get("child_bias", 0.0)),
                   kind_cutoff=float(metadata["kind_cutoff"]) if "kind_cutoff" in metadata else None,
                   kind_model_fingerprint=metadata.get("kind_model_fingerprint", ""))

    @classmethod
    def load(cls, model_id: str | Path) -> DomainStats | None:
        path = _model_file(model_id, STATS_FILE)
        return cls.read(path) if path else None


def check_input(image: Image.Image) -> np.ndarray:
    """The kind model's input for one image, for the fit and the app alike: its grey thumbnail, (1, side, side),
    with the image's own mean and spread removed (a film's exposure and window say which hospital it came from,
    not what it shows)."""
    thumbnail = image.convert("L").resize((CHECK_SIDE, CHECK_SIDE), Image.Resampling.BILINEAR, reducing_gap=2.0)
    pixels = np.asarray(thumbnail, dtype=np.float32)
    return ((pixels - pixels.mean()) / max(float(pixels.std()), 1.0))[None]


@dataclass
class KindModel:
    """A small CNN with a softmax over KINDS, on `check_input` thumbnails, run in numpy (torch's thread pool
    would compete with the fast path's ONNX Runtime threads). Its layers, as ood/fit.py's kind_tensors stores
    them: 3x3 convolutions `conv0`, `conv1`, ... (batch norm folded in), each followed by ReLU and 2x2 max
    pooling; then `hidden` (ReLU) and `output`, on the maps flattened channel first, as torch flattens them."""

    tensors: dict[str, np.ndarray]
    threshold: float  # an input is flagged when P(pediatric chest X-ray) is below this
    metadata: dict[str, str] = field(default_factory=dict)  # how it was fitted (ood/fit.py)

    @functools.cached_property
    def _convolutions(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each convolution as a (9 x in, out) matrix over the 3x3 neighbourhood (row, column, channel), and its bias."""
        layers = []
        while f"conv{len(layers)}.weight" in self.tensors:
            weight = self.tensors[f"conv{len(layers)}.weight"]
            layers.append((np.ascontiguousarray(weight.transpose(2, 3, 1, 0).reshape(-1, len(weight))),
                           self.tensors[f"conv{len(layers)}.bias"]))
        return layers

    def probabilities(self, inputs: np.ndarray) -> np.ndarray:
        """(N, len(KINDS)) probabilities for `check_input` thumbnails, (N, 1, side, side) or one (1, side, side)."""
        maps = np.asarray(inputs, dtype=np.float32)
        maps = (maps[None] if maps.ndim == 3 else maps).transpose(0, 2, 3, 1)  # (N, height, width, channels)
        for weight, bias in self._convolutions:
            _, height, width, _ = maps.shape
            padded = np.pad(maps, ((0, 0), (1, 1), (1, 1), (0, 0)))
            neighbourhoods = np.concatenate([padded[:, row:row + height, column:column + width]
                                             for row in range(3) for column in range(3)], axis=3)
            maps = np.maximum(neighbourhoods @ weight + bias, 0.0)
            maps = np.maximum(np.maximum(maps[:, 0::2, 0::2], maps[:, 1::2, 0::2]),
                              np.maximum(maps[:, 0::2, 1::2], maps[:, 1::2, 1::2]))
        features = maps.transpose(0, 3, 1, 2).reshape(len(maps), -1)
        hidden = np.maximum(features @ self.tensors["hidden.weight"].T + self.tensors["hidden.bias"], 0.0)
        logits = hidden @ self.tensors["output.weight"].T + self.tensors["output.bias"]
        logits = logits - logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)

    @functools.cached_property
    def fingerprint(self) -> str:
        """A hash of the weights: which kind model a combined cut-off belongs to."""
        digest = hashlib.sha256()
        for name in sorted(self.tensors):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(self.tensors[name], dtype=np.float32).tobytes())
        return digest.hexdigest()[:16]

    def save(self, folder: str | Path) -> Path:
        metadata = {**self.metadata, "format": CHECK_FORMAT, "threshold": repr(self.threshold),
                    "kinds": ",".join(KINDS), "inputs": CHECK_INPUTS}
        tensors = {name: np.ascontiguousarray(array, dtype=np.float32) for name, array in self.tensors.items()}
        return _write_safetensors(folder, CHECK_FILE, tensors, metadata)

    @classmethod
    def read(cls, path: str | Path) -> KindModel:
        tensors, metadata = _read_safetensors(path, CHECK_FORMAT, fitted_by="kind_model")
        if metadata.get("kinds") != ",".join(KINDS) or metadata.get("inputs") != CHECK_INPUTS:
            raise ValueError(f"{path}: fitted for kinds {metadata.get('kinds')!r} on inputs {metadata.get('inputs')!r}; "
                             f"this code reads {','.join(KINDS)!r} on {CHECK_INPUTS!r}: {_refit('kind_model')}")
        return cls(tensors=tensors, threshold=float(metadata["threshold"]),
                   metadata={k: v for k, v in metadata.items() if k not in ("format", "threshold", "kinds", "inputs")})

    @classmethod
    def load(cls, model_id: str | Path) -> KindModel | None:
        path = _model_file(model_id, CHECK_FILE)
        return cls.read(path) if path else None


@dataclass
class DomainCheck:
    """The verdict on one input; `reasons` is empty when it looks in-domain."""

    chroma: float
    grey_std: float
    kind_probabilities: dict[str, float] | None = None  # the kind model's output, where the model has it
    kind_score: float | None = None  # rule 3's score: P(pediatric), or the combined score (kind_score)
    kind_threshold: float | None = None  # rule 3 flags below it
    distance: float | None = None
    distance_threshold: float | None = None
    reasons: list[str] = field(default_factory=list)
    fired: list[str] = field(default_factory=list)  # the rules that flagged it: RULES names, in order
    looks_like: str = PEDIATRIC  # a KINDS key, COLOUR, BLANK or UNFAMILIAR: what the first rule that fired says

    @property
    def in_domain(self) -> bool:
        return not self.reasons

    def checks_run(self) -> str:
        names = ["colour", "contrast"]
        if self.kind_probabilities is not None:
            names.append("image-kind")
        if self.distance is not None:
            names.append("feature-distance")
        return ", ".join(names[:-1]) + " and " + names[-1]

    def message(self) -> str:
        if self.in_domain:
            return f"The input passed the {self.checks_run()} checks for a pediatric chest X-ray like the training images."
        return (
            "This does not look like a pediatric chest X-ray like the ones the model was trained on: "
            + "; ".join(self.reasons)
            + ". The model's answer is not meaningful for it."
        )

    def verdict(self) -> dict:
        """The machine-readable form the API returns (webapp.py documents it)."""
        kind_p = None if self.kind_probabilities is None else round(self.kind_probabilities[PEDIATRIC], 6)
        return {"in_domain": self.in_domain, "looks_like": self.looks_like, "reasons": list(self.reasons),
                "rules_fired": list(self.fired), "checks": self.checks_run(), "p_pediatric_chest_xray": kind_p}


def kind_score(p_pediatric: np.ndarray, child_score: np.ndarray) -> np.ndarray:
    """Rule 3's combined score: the kind model's logit P(pediatric) plus the features' child_score."""
    p = np.clip(np.asarray(p_pediatric, dtype=np.float64), 1e-7, 1 - 1e-7)  # a saturated softmax stays finite
    return np.log(p) - np.log1p(-p) + child_score


def check_domain(reading: XrayReading, features: np.ndarray | None, stats: DomainStats | None,
                 kind_model: KindModel | None = None, min_side: int | None = None) -> DomainCheck:
    """Applies the rules: resolution where `min_side` is given, kind where `kind_model` is, features
    where `stats` and `features` are."""
    pixels = np.asarray(reading.image)
    step = max(1, max(pixels.shape) // 256)  # the spread is sampled on ~256 px a side, as chroma is
    check = DomainCheck(chroma=reading.chroma, grey_std=float(pixels[::step, ::step].std()))

    def flag(rule: str, reason: str, looks_like: str) -> None:
        if not check.fired:  # the first rule that fires says what the input looks like
            check.looks_like = looks_like
        check.fired.append(rule)
        check.reasons.append(reason)

    width, height = reading.stored_size or reading.image.size
    if min_side is not None and min(width, height) < min_side:
        flag("resolution", f"it is only {width}x{height} pixels; the model reads films at {min_side}x{min_side} and "
                           f"needs at least {min_side} pixels on the short side: upload the X-ray at a higher "
                           "resolution (the original file, not a thumbnail or screenshot)", LOW_RESOLUTION)
    if reading.transparency > MAX_TRANSPARENCY:
        flag("transparency", f"it is partly transparent ({reading.transparency:.0%} of pixels); X-ray files have no "
                             "transparency: export the image without an alpha channel (flattened) and upload it again",
             TRANSPARENT)
    if check.chroma > MAX_CHROMA:
        flag("colour", f"it is a colour image (mean chroma {check.chroma:.0f}; X-rays are grey)", COLOUR)
    if check.grey_std < MIN_STD:
        flag("blank", f"it is nearly blank (grey-level spread {check.grey_std:.1f})", BLANK)
    if kind_model is not None:
        probabilities = kind_model.probabilities(check_input(reading.image))[0]
        check.kind_probabilities = {kind: float(p) for kind, p in zip(KINDS, probabilities)}
        if features is not None and stats is not None and stats.combines_with(kind_model):
            check.kind_score = float(kind_score(probabilities[0], stats.child_score(features))[0])
            check.kind_threshold = stats.kind_cutoff
        else:
            check.kind_score, check.kind_threshold = float(probabilities[0]), kind_model.threshold
        if check.kind_score < check.kind_threshold:
            likeliest = KINDS[1 + int(np.argmax(probabilities[1:]))]
            flag("kind", LOOKS_LIKE[likeliest], likeliest)
    if stats is not None and features is not None:
        check.distance = float(stats.distance(features)[0])
        check.distance_threshold = stats.threshold
        if check.distance > stats.threshold:
            flag("features", f"the model's features are far from its training X-rays (distance {check.distance:.1f}, "
                             f"above the {stats.quantile:.1%} validation quantile {stats.threshold:.1f})", UNFAMILIAR)
    return check
