"""The prepared dataset as `datasets` sees it, and the transforms that feed the model.

Splits come from `load_dataset("imagefolder", data_dir=...)` on the folder data_prep writes
(train / validation / test, each with NORMAL and PNEUMONIA sub-folders) or from a Hub dataset
with the same labels.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .images import IMAGE_SUFFIXES, LABELS, load_xray
from .preprocess import PixelSpec, pixel_values, resize_gray

SPLITS = ("train", "validation", "test")


def load_splits(data_dir: str | None = None, dataset_name: str | None = None):
    """Loads the prepared splits and checks that the labels are NORMAL and PNEUMONIA, in that order."""
    from datasets import load_dataset

    if bool(data_dir) == bool(dataset_name):
        raise ValueError("give exactly one of data_dir (a prepared folder) or dataset_name (a Hub dataset)")
    if data_dir:
        root = Path(data_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no such folder. Run data_prep/prepare.py first.")
        check_prepared_folder(root)
        splits = load_dataset("imagefolder", data_dir=str(root))
    else:
        splits = load_dataset(dataset_name)
    for name, split in splits.items():
        names = tuple(split.features["label"].names)
        if names != LABELS:
            raise ValueError(f"split {name!r} has labels {names}; expected {LABELS}")
    return splits


def _imagefolder_suffixes() -> tuple[str, ...]:
    """The file endings `load_dataset("imagefolder")` loads as images (many more than data_prep writes)."""
    try:
        from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

        return tuple(sorted(suffix.lower() for suffix in ImageFolder.EXTENSIONS))
    except (ImportError, AttributeError):
        return IMAGE_SUFFIXES


def _examples(root: Path, names: list[str], limit: int = 5) -> str:
    shown = ", ".join(str(root / name) for name in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_prepared_folder(root: Path) -> None:
    """Names what changed in a prepared folder since data_prep wrote it, before training reads it.

    Errors: an image listed in prepared_index.csv is gone or empty; a file that imagefolder would
    read as metadata (metadata.csv/jsonl/parquet) appeared; an image that imagefolder would load
    appeared but does not decode. Warnings: other images appeared (they are used, though data_prep
    did not write them: check they do not come from another split); non-image files appeared (they
    are ignored). Hidden files (.DS_Store, ._x.png) are ignored, as imagefolder ignores them.
    """
    import csv
    import warnings

    from .images import InvalidImageError

    index_path = root / "prepared_index.csv"
    if not index_path.exists():
        warnings.warn(f"{index_path} is missing: cannot check the folder against what data_prep wrote")
        return
    with index_path.open(newline="") as handle:
        expected = {row["prepared_file"] for row in csv.DictReader(handle)}
    present = {
        path.relative_to(root).as_posix(): path for path in root.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts)
    }
    missing = sorted(expected - set(present))
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} prepared image(s) listed in {index_path} are gone: {_examples(root, missing)}. "
            "Run data_prep/prepare.py again (with --overwrite)."
        )
    empty = sorted(name for name in expected if present[name].stat().st_size == 0)
    if empty:
        raise ValueError(f"{len(empty)} prepared image(s) are empty files: {_examples(root, empty)}. Run data_prep/prepare.py again.")
    # Top-level files (the index, prepare_report.json) are not read by imagefolder; only split folders are.
    unexpected = sorted(name for name in set(present) - expected if "/" in name)
    metadata = [name for name in unexpected if name.rsplit("/", 1)[-1].lower() in ("metadata.csv", "metadata.jsonl", "metadata.parquet")]
    if metadata:
        raise ValueError(
            f"{_examples(root, metadata)}: imagefolder would read this as labels/metadata for the images beside it; "
            "move it out of the prepared folder"
        )
    loadable = _imagefolder_suffixes()
    extra_images = [name for name in unexpected if name.lower().endswith(loadable)]
    non_images = [name for name in unexpected if name not in extra_images]
    if non_images:
        warnings.warn(f"ignoring {len(non_images)} non-image file(s) not written by data_prep: {_examples(root, non_images)}")
    if extra_images:
        for name in extra_images:
            try:
                load_xray(present[name])
            except (InvalidImageError, OSError, ValueError) as error:
                raise ValueError(
                    f"{root / name} is in the prepared folder but not in {index_path.name}, and training would fail "
                    f"on it ({str(error).rstrip('.')}). Remove it, or run data_prep/prepare.py again."
                ) from error
        warnings.warn(
            f"{len(extra_images)} image(s) not written by data_prep (not in {index_path.name}) will be used: "
            f"{_examples(root, extra_images)}. Make sure none comes from another split."
        )


@dataclass(frozen=True)
class Augmentation:
    """Random changes that a chest radiograph can plausibly show.

    No flips: a mirrored chest puts the heart on the right (dextrocardia), a different anatomy.
    Small rotations and shifts: children are positioned less precisely than adults.
    Zoom: field of view and patient size vary between exposures.
    Brightness and contrast: exposure and detector settings vary between machines.
    """

    rotation_degrees: float = 7.0
    zoom: float = 0.1
    shift: float = 0.05
    brightness: float = 0.15
    contrast: float = 0.15

    def __call__(self, image: Image.Image) -> Image.Image:
        # The global `random` state is what Trainer checkpoints and restores, and what DataLoader
        # workers seed per worker: a resumed run draws the same augmentations as an unbroken one.
        side = image.size[0]
        angle = math.radians(random.uniform(-self.rotation_degrees, self.rotation_degrees))
        scale = 1.0 / random.uniform(1.0 - self.zoom, 1.0 + self.zoom)
        shift_x, shift_y = (random.uniform(-self.shift, self.shift) * side for _ in range(2))
        # PIL maps each output pixel back to an input pixel: input = A @ (output - centre) + centre + shift
        cos, sin = math.cos(angle) * scale, math.sin(angle) * scale
        centre = (side - 1) / 2
        coefficients = (
            cos, -sin, centre - cos * centre + sin * centre + shift_x,
            sin, cos, centre - sin * centre - cos * centre + shift_y,
        )
        image = image.transform(image.size, Image.Transform.AFFINE, coefficients, Image.Resampling.BILINEAR)
        gain = random.uniform(1 - self.contrast, 1 + self.contrast)
        offset = random.uniform(-self.brightness, self.brightness) * 255
        pixels = np.asarray(image, dtype=np.float32)
        pixels = (pixels - pixels.mean()) * gain + pixels.mean() + offset
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L")


class BatchTransform:
    """`datasets.set_transform` callable: decoded images -> pixel_values, labels."""

    def __init__(self, spec: PixelSpec, augmentation: Augmentation | None = None):
        self.spec = spec
        self.augmentation = augmentation

    def __call__(self, batch: dict) -> dict:
        images = [resize_gray(load_xray(image), self.spec.size) for image in batch["image"]]
        if self.augmentation is not None:
            images = [self.augmentation(image) for image in images]
        return {"pixel_values": pixel_values(images, self.spec), "labels": torch.tensor(batch["label"])}


def collate(examples: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.stack([example["labels"] for example in examples]),
    }
