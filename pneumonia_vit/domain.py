"""Out-of-domain check: does an input look like the pediatric chest X-rays the model learned from?

The classifier answers NORMAL or PNEUMONIA for anything, a cat photo included. Three rules flag an
input whose answer means nothing; the app shows the reason next to the result, predict.py writes
it to its CSV. A flagged input is still scored: the rules are a warning, not a refusal.

1. colour: a radiograph carries no colour. The file's mean chroma (max-minus-min of R, G, B,
   in grey levels) above MAX_CHROMA flags photographs, screenshots and coloured drawings.
   Radiographs stored as RGB JPEGs (99 Kermany PNEUMONIA originals are) read about 0 and pass.
2. flat: a blank, uniform or nearly uniform image (grey-level standard deviation below MIN_STD);
   the 624 Kermany test originals have a standard deviation of at least ~32.
3. features: the Mahalanobis distance of the model's final [CLS] embedding (what the
   classification head sees) to the training-set embeddings, above the `quantile` (99.5 %) of the
   validation-set distances. This catches grey images that are not chest X-rays and, to the extent
   the model's features separate them, radiographs unlike the training set (adults, other body
   parts). The mean and (Ledoit-Wolf shrunk) precision matrix are saved as domain_stats.safetensors
   in the model folder, written by train_vit.py at the end of training or afterwards with

       python -m pneumonia_vit.domain MODEL_DIR --data_dir data/chest_xray_prepared

   A model without the file is served with rules 1 and 2 only.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .images import IMAGE_SUFFIXES, InvalidImageError, XrayReading, load_xray
from .preprocess import PixelSpec, pixel_values

STATS_FILE = "domain_stats.safetensors"
STATS_FORMAT = "pneumonia_vit.domain/1"
MAX_CHROMA = 6.0  # grey levels; JPEG noise on a grey RGB file stays below 1
MIN_STD = 10.0  # grey levels, on 0..255
DEFAULT_QUANTILE = 0.995


@dataclass
class DomainStats:
    """Gaussian model of the training embeddings and the distance beyond which an input is flagged."""

    mean: np.ndarray  # (hidden,)
    precision: np.ndarray  # (hidden, hidden), inverse of the shrunk covariance
    threshold: float  # Mahalanobis distance cut-off
    quantile: float  # the validation quantile the cut-off was taken at
    train_count: int
    validation_count: int

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row of `features` (N, hidden) to the training mean."""
        centred = np.atleast_2d(np.asarray(features, dtype=np.float64)) - self.mean
        squared = np.einsum("nd,de,ne->n", centred, self.precision, centred)
        return np.sqrt(np.maximum(squared, 0.0))

    def save(self, folder: str | Path) -> Path:
        from safetensors.numpy import save_file

        path = Path(folder) / STATS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {
            "format": STATS_FORMAT, "threshold": repr(self.threshold), "quantile": repr(self.quantile),
            "train_count": str(self.train_count), "validation_count": str(self.validation_count),
        }
        save_file({"mean": self.mean.astype(np.float64), "precision": self.precision.astype(np.float64)}, str(path), metadata)
        return path

    @classmethod
    def read(cls, path: str | Path) -> DomainStats:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != STATS_FORMAT:
                raise ValueError(f"{path}: not a {STATS_FORMAT} file (format {metadata.get('format')!r})")
            return cls(
                mean=handle.get_tensor("mean"), precision=handle.get_tensor("precision"),
                threshold=float(metadata["threshold"]), quantile=float(metadata["quantile"]),
                train_count=int(metadata["train_count"]), validation_count=int(metadata["validation_count"]),
            )

    @classmethod
    def load(cls, model_id: str | Path) -> DomainStats | None:
        """The stats beside a model (a local folder or a Hub id), or None where there are none."""
        folder = Path(model_id)
        if folder.is_dir():
            path = folder / STATS_FILE
            return cls.read(path) if path.is_file() else None
        try:
            from huggingface_hub import hf_hub_download

            return cls.read(hf_hub_download(str(model_id), STATS_FILE))
        except Exception:  # no such file in the repo, offline, private repo: serve without rule 3
            return None


@dataclass
class DomainCheck:
    """The verdict on one input; `reasons` is empty when it looks in-domain."""

    chroma: float
    grey_std: float
    distance: float | None = None
    distance_threshold: float | None = None
    reasons: list[str] = field(default_factory=list)

    @property
    def in_domain(self) -> bool:
        return not self.reasons

    def message(self) -> str:
        if self.in_domain:
            checked = "colour, contrast and feature-distance" if self.distance is not None else "colour and contrast"
            return f"The input passed the {checked} checks for a pediatric chest X-ray like the training images."
        return (
            "This does not look like a pediatric chest X-ray like the ones the model was trained on: "
            + "; ".join(self.reasons)
            + ". The prediction above is not meaningful for it."
        )


def grey_std(image: Image.Image) -> float:
    pixels = np.asarray(image)
    step = max(1, max(pixels.shape) // 256)
    return float(pixels[::step, ::step].std())


def check_domain(reading: XrayReading, features: np.ndarray | None, stats: DomainStats | None) -> DomainCheck:
    """Applies the three rules (the third only where `stats` and `features` are given)."""
    check = DomainCheck(chroma=reading.chroma, grey_std=grey_std(reading.image))
    if check.chroma > MAX_CHROMA:
        check.reasons.append(f"it is a colour image (mean chroma {check.chroma:.0f}; X-rays are grey)")
    if check.grey_std < MIN_STD:
        check.reasons.append(f"it is nearly blank (grey-level spread {check.grey_std:.1f})")
    if stats is not None and features is not None:
        check.distance = float(stats.distance(features)[0])
        check.distance_threshold = stats.threshold
        if check.distance > stats.threshold:
            check.reasons.append(
                f"the model's features are far from its training X-rays (distance {check.distance:.1f}, "
                f"above the {stats.quantile:.1%} validation quantile {stats.threshold:.1f})"
            )
    return check


def _images(source, batch_size: int) -> Iterator[Image.Image]:
    """Grey images from a `datasets` split (its "image" column, ignoring any transform set on it),
    or from an iterable of paths, bytes or PIL images."""
    if hasattr(source, "with_format"):
        for batch in source.with_format(None).iter(batch_size=batch_size):
            for image in batch["image"]:
                yield load_xray(image)
    else:
        for item in source:
            yield load_xray(item)


def embed(model, spec: PixelSpec, images: Iterable, batch_size: int = 64) -> np.ndarray:
    """The head-input features of every image, (N, hidden), in order."""
    from .backends import forward

    was_training = model.training
    model.eval()
    chunks, batch = [], []
    try:
        for image in _images(images, batch_size):
            batch.append(image)
            if len(batch) == batch_size:
                chunks.append(forward(model, pixel_values(batch, spec)).features)
                batch = []
        if batch:
            chunks.append(forward(model, pixel_values(batch, spec)).features)
    finally:
        model.train(was_training)
    if not chunks:
        raise ValueError("no images to embed")
    return np.concatenate(chunks).astype(np.float64)


def fit_domain_stats(
    model, spec: PixelSpec, train, validation, output_dir: str | Path | None = None,
    quantile: float = DEFAULT_QUANTILE, batch_size: int = 64,
) -> DomainStats:
    """Fits rule 3 on the training split and sets its cut-off on the validation split.

    `train` and `validation` are `datasets` splits with an "image" column (a transform set on them,
    such as training augmentation, is bypassed) or iterables of image paths / PIL images. The
    covariance is Ledoit-Wolf shrunk, so it stays invertible with fewer images than dimensions.
    With `output_dir`, the stats are saved there as domain_stats.safetensors.
    """
    from sklearn.covariance import LedoitWolf

    train_features = embed(model, spec, train, batch_size)
    validation_features = embed(model, spec, validation, batch_size)
    estimate = LedoitWolf().fit(train_features)
    stats = DomainStats(
        mean=estimate.location_, precision=estimate.precision_, threshold=float("inf"), quantile=quantile,
        train_count=len(train_features), validation_count=len(validation_features),
    )
    stats.threshold = float(np.quantile(stats.distance(validation_features), quantile))
    if output_dir is not None:
        path = stats.save(output_dir)
        print(
            f"domain stats: {stats.train_count} training embeddings, cut-off {stats.threshold:.2f} "
            f"= {quantile:.1%} quantile of {stats.validation_count} validation distances -> {path}"
        )
    return stats


def _files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)


def measure(service, folder: Path) -> dict:
    """How often each rule fires on the images under `folder` (the whole check, as the app runs it)."""
    counts = {"images": 0, "flagged": 0, "colour": 0, "flat": 0, "features": 0, "unreadable": 0}
    for path in _files(folder):
        try:
            analysis = service.analyze(path, explain=False)
        except InvalidImageError:
            counts["unreadable"] += 1
            continue
        counts["images"] += 1
        check = analysis.domain
        counts["flagged"] += not check.in_domain
        counts["colour"] += check.chroma > MAX_CHROMA
        counts["flat"] += check.grey_std < MIN_STD
        counts["features"] += check.distance is not None and check.distance > (check.distance_threshold or np.inf)
    counts["flagged_fraction"] = counts["flagged"] / counts["images"] if counts["images"] else float("nan")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pneumonia_vit.domain",
        description="Fit the out-of-domain statistics of a trained model and save them in its folder.",
    )
    parser.add_argument("model_dir", help="a trained model folder (config.json, model.safetensors, preprocessor_config.json)")
    parser.add_argument("--data_dir", help="prepared data (train/ and validation/ folders) to fit on; leave out to only --measure")
    parser.add_argument("--quantile", type=float, default=DEFAULT_QUANTILE, help="validation quantile of the cut-off")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument(
        "--measure", nargs="*", default=None, metavar="FOLDER",
        help="folders of images to report the firing rate on (default with --data_dir: its test/ split)",
    )
    args = parser.parse_args(argv)

    from .serving import Service

    if args.data_dir:
        from .data import load_splits
        from .model import Classifier

        classifier = Classifier.load(args.model_dir, fast=False)  # the features the app computes: fp32 PyTorch
        splits = load_splits(args.data_dir)
        fit_domain_stats(classifier.model, classifier.spec, splits["train"], splits["validation"],
                         output_dir=args.model_dir, quantile=args.quantile, batch_size=args.batch_size)
    folders = args.measure
    if folders is None:
        folders = [str(Path(args.data_dir) / "test")] if args.data_dir and (Path(args.data_dir) / "test").is_dir() else []
    if folders:
        service = Service.load(args.model_dir)
        for folder in folders:
            print(json.dumps({"folder": folder, **measure(service, Path(folder))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
