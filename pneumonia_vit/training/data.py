"""The prepared dataset (data_prep's folder as an imagefolder, or a Hub dataset with the same labels) as
`datasets` sees it, and the transforms that feed the model."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from ..images import IMAGE_SUFFIXES, LABELS, InvalidImageError, load_xray
from ..preprocess import PixelSpec, pixel_values, resize_gray

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
    """Names what changed in a prepared folder since data_prep wrote it, before training reads it: an error for
    what would break or silently change training, a warning for what imagefolder uses or ignores."""
    import csv
    import warnings

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
        raise FileNotFoundError(f"{len(missing)} prepared image(s) listed in {index_path} are gone: "
                                f"{_examples(root, missing)}. Run data_prep/prepare.py again (with --overwrite).")
    empty = sorted(name for name in expected if present[name].stat().st_size == 0)
    if empty:
        raise ValueError(f"{len(empty)} prepared image(s) are empty files: {_examples(root, empty)}. Run data_prep/prepare.py again.")
    # Top-level files (the index, prepare_report.json) are not read by imagefolder; only split folders are.
    unexpected = sorted(name for name in set(present) - expected if "/" in name)
    metadata = [name for name in unexpected if name.rsplit("/", 1)[-1].lower() in ("metadata.csv", "metadata.jsonl", "metadata.parquet")]
    if metadata:
        raise ValueError(f"{_examples(root, metadata)}: imagefolder would read this as labels/metadata for the images "
                         "beside it; move it out of the prepared folder")
    loadable = _imagefolder_suffixes()
    extra_images = [name for name in unexpected if name.lower().endswith(loadable)]
    non_images = [name for name in unexpected if name not in extra_images]
    if non_images:
        warnings.warn(f"ignoring {len(non_images)} non-image file(s) not written by data_prep: {_examples(root, non_images)}")
    if extra_images:
        for name in extra_images:
            if (why := _unreadable(present[name])) is not None:
                raise ValueError(f"{root / name} is in the prepared folder but not in {index_path.name}, and training "
                                 f"would fail on it ({why}). Remove it, or run data_prep/prepare.py again.")
        warnings.warn(
            f"{len(extra_images)} image(s) not written by data_prep (not in {index_path.name}) will be used: "
            f"{_examples(root, extra_images)}. Make sure none comes from another split."
        )


def unlabeled_images(folders: list[str]) -> tuple[list[str], list[str]]:
    """Every file below `folders` that the project's image reader reads, and "file (why)" for every other one; a
    prepared folder's validation and test splits are refused (they choose and score the classifier)."""
    from concurrent.futures import ThreadPoolExecutor

    files = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder")
        resolved = folder.resolve()
        for prepared_root in (resolved, *resolved.parents):
            if (prepared_root / "prepared_index.csv").is_file() and not resolved.is_relative_to(prepared_root / "train"):
                raise ValueError(f"{folder} holds a prepared dataset's validation or test split; give its train/ folder only")
        files += sorted(path for path in folder.rglob("*") if path.is_file() and not path.name.startswith("."))
    with ThreadPoolExecutor() as pool:  # Pillow releases the GIL while decoding
        problems = list(pool.map(_unreadable, files))
    readable = [str(path) for path, why in zip(files, problems) if why is None]
    if not readable:
        raise ValueError(f"no readable image in {', '.join(folders)}" + (f": {len(files)} file(s), none an image" if files else " (empty)"))
    return readable, [f"{path} ({why})" for path, why in zip(files, problems) if why is not None]


def _unreadable(path: Path) -> str | None:
    """Why the project's image reader refuses `path`, or None."""
    try:
        load_xray(path)
    except (InvalidImageError, OSError, ValueError) as error:
        return str(error).rstrip(".")
    return None


@dataclass(frozen=True)
class Augmentation:
    """Random changes that a chest radiograph can plausibly show, drawn per image from its own generator; the
    augmentation flags of train_vit.py and pretrain_mae.py.

    No flips: a mirrored chest puts the heart on the right (dextrocardia), a different anatomy.
    Random resized crops with aspect-ratio jitter: the Kermany PNEUMONIA originals are wider than the
    NORMAL ones, and squashing every image to a square turns that into a geometric class cue that the
    test patients do not follow; crops of varying width and height make the cue carry no information.
    Zoom out (off unless asked for): a dark margin around the body, which NORMAL training films carry more of.
    Small rotations: children are positioned less precisely than adults.
    Gamma, brightness, contrast, blur, noise and JPEG quality: machines and hospitals differ.
    """

    crop_scale: float = field(default=0.6, metadata={"help": "Smallest random crop, as a fraction of the image area."})
    aspect_jitter: float = field(default=1.45, metadata={"help": "Crop width/height drawn log-uniformly in [1/jitter, jitter] (1: square)."})
    zoom_out: float = field(default=1.0, metadata={"help": (
        "Place half of the films on a black canvas up to this many times their side before the crop (1: never), so "
        "that the dark margin around the body does not tell the classes apart.")})
    rotation_degrees: float = field(default=7.0, metadata={"help": "Largest random rotation, degrees."})
    gamma: float = field(default=0.4, metadata={"help": "Random gamma drawn log-uniformly between 1/(1+gamma) and 1+gamma."})
    exposure: float = field(default=0.15, metadata={"help": "Largest random brightness and contrast change, as a fraction."})
    blur: float = field(default=1.0, metadata={"help": "Largest Gaussian blur radius, output pixels (a quarter of the images)."})
    noise: float = field(default=0.03, metadata={"help": "Largest Gaussian noise sigma, fraction of full scale (a quarter of the images)."})
    jpeg_quality: int = field(default=30, metadata={"help": "Lowest JPEG re-encoding quality (a quarter of the images)."})

    def __call__(self, image: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
        if self.zoom_out > 1 and rng.random() < 0.5:
            factor = rng.uniform(1.0, self.zoom_out)
            canvas = Image.new("L", (round(image.width * factor), round(image.height * factor)), 0)
            canvas.paste(image, (int(rng.integers(0, canvas.width - image.width + 1)),
                                 int(rng.integers(0, canvas.height - image.height + 1))))
            image = canvas
        width, height = image.size
        area = rng.uniform(self.crop_scale, 1.0)
        aspect = math.exp(rng.uniform(-math.log(self.aspect_jitter), math.log(self.aspect_jitter)))
        crop_width = min(width, width * math.sqrt(area * aspect))
        crop_height = min(height, height * math.sqrt(area / aspect))
        left, top = rng.uniform(0, width - crop_width), rng.uniform(0, height - crop_height)
        image = image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + crop_width, top + crop_height))
        image = image.rotate(rng.uniform(-self.rotation_degrees, self.rotation_degrees), Image.Resampling.BILINEAR)
        if rng.random() < 0.25:
            image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, self.blur)))

        pixels = np.asarray(image, dtype=np.float32) / 255.0
        pixels **= math.exp(rng.uniform(-math.log1p(self.gamma), math.log1p(self.gamma)))
        mean = pixels.mean()
        pixels = (pixels - mean) * rng.uniform(1 - self.exposure, 1 + self.exposure) + mean
        pixels += rng.uniform(-self.exposure, self.exposure)
        if rng.random() < 0.25:
            pixels += rng.normal(0.0, rng.uniform(0.0, self.noise), pixels.shape).astype(np.float32)
        image = Image.fromarray(np.clip(pixels * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
        if rng.random() < 0.25:
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=int(rng.integers(self.jpeg_quality, 96)))
            image = Image.open(buffer)
            image.load()
        return image


def centre_crop(image: Image.Image, fraction: float, size: int) -> Image.Image:
    """The central `fraction` of a film's width and height, resized to a `size` square (1: the whole film,
    `resize_gray`); for scoring films framed tighter than the training ones (`evaluate_vit.py --centre_crop`)."""
    if fraction == 1:
        return resize_gray(image, size)
    width, height = image.size
    left, top = width * (1 - fraction) / 2, height * (1 - fraction) / 2
    return image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, width - left, height - top))


def check_crop(fraction: float) -> None:
    """Refuses a centre crop that is not a fraction of the film's width and height."""
    if not 0 < fraction <= 1:
        raise ValueError(f"a centre crop is a fraction of the film's width and height in (0, 1], got {fraction}")


SAMPLE_INDEX = "sample_index"  # the training split's column that seeds each image's augmentation


class BatchTransform:
    """`datasets.set_transform` callable: decoded images -> pixel_values, labels.

    With an augmentation, image i of epoch e is augmented by a generator seeded with (seed, e, i) (i from the
    split's SAMPLE_INDEX column; e set by `trainer.AugmentationEpoch`), and by nothing else: not the number of
    processes or workers, not the batch, not a resume. Without one, `crop` < 1 scores the middle of each film.
    """

    def __init__(self, spec: PixelSpec, augmentation: Augmentation | None = None, seed: int = 0, crop: float = 1.0):
        check_crop(crop)
        if augmentation is not None and crop != 1:
            raise ValueError("a centre crop is for scoring, not for an augmented training split")
        self.spec = spec
        self.augmentation = augmentation
        self.crop = crop
        self.seed = seed
        self.epoch = 0

    def __call__(self, batch: dict) -> dict:
        images = [load_xray(image) for image in batch["image"]]
        if self.augmentation is None:
            images = [centre_crop(image, self.crop, self.spec.size) for image in images]
        else:
            images = [
                self.augmentation(image, self.spec.size, np.random.default_rng((self.seed, self.epoch, index)))
                for image, index in zip(images, batch[SAMPLE_INDEX])
            ]
        batch_out = {"pixel_values": pixel_values(images, self.spec)}
        if "label" in batch:
            batch_out["labels"] = torch.tensor(batch["label"])
        return batch_out


def with_sample_index(split):
    """The split with the SAMPLE_INDEX column that BatchTransform's augmentation reads."""
    return split.add_column(SAMPLE_INDEX, list(range(len(split))))


def collate(examples: list[dict]) -> dict:
    return {key: torch.stack([example[key] for example in examples]) for key in examples[0]}
