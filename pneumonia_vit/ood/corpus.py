"""The out-of-domain training corpus: the four kinds of image (check.KINDS) that ood/fit.py fits the kind model
and the child score on, never from the test split. Adult films come from the "fit" part of `adult_fold`'s NIH
patients ("select" sets the child score's weight; "held_out" is read only by benchmarks/domain_check.py); altered
films are turned, inverted or cropped chest films; non-X-rays are drawn here (`synthetic_image`). Every X-ray
passes through `source_augment` first, which varies what differs between hospitals and scanners (exposure,
processing, resolution, compression), so that the kind model learns the anatomy and the layout of the film
rather than how NIH's files look.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps

from ..images import IMAGE_SUFFIXES, MIN_SIDE, load_xray
from .check import KINDS, check_input

log = logging.getLogger(__name__)

PEDIATRIC, ADULT, ALTERED, NOT_XRAY = range(len(KINDS))
PEDIATRIC_COPIES = 2  # augmented copies of each pediatric training film (and as many adult inputs)
SYNTHETIC_COUNT = 6000
ADULT_FOLDS = (("fit", 60), ("select", 20), ("held_out", 20))  # percent of NIH patients


def image_files(folder: str | Path) -> list[Path]:
    return sorted(path for path in Path(folder).rglob("*") if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)


def adult_fold(patient_id: str) -> str:
    """A patient's fold, fixed by a hash of the NIH patient id: all of a patient's images on one
    side, the same folds in every run and in benchmarks/domain_check.py."""
    bucket = int(hashlib.sha256(patient_id.encode()).hexdigest(), 16) % 100
    for name, percent in ADULT_FOLDS:
        if bucket < percent:
            return name
        bucket -= percent
    raise AssertionError("ADULT_FOLDS must add up to 100")


def adult_files(adult_dir: str | Path, fold: str) -> list[Path]:
    """The adult images of one fold, by provenance.csv's patient ids."""
    adult_dir = Path(adult_dir)
    with (adult_dir / "provenance.csv").open(newline="") as handle:
        return sorted(adult_dir / row["file"] for row in csv.DictReader(handle) if adult_fold(row["nih_patient_id"]) == fold)


# ---- what varies between sources, and what is not a pediatric film -------------------------------

def source_augment(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A grey X-ray as another hospital might have stored it: cropped, squashed, resampled, its contrast and gamma
    changed, maybe blurred, equalised or JPEG-compressed."""
    width, height = image.size
    scale = rng.uniform(0.8, 1.0)
    crop_width, crop_height = int(width * scale * rng.uniform(0.92, 1.0)), int(height * scale * rng.uniform(0.92, 1.0))
    image = _random_crop(image, crop_width, crop_height, rng)
    side = int(rng.integers(48, 320))  # resolution: some sources store small files
    aspect = rng.uniform(0.75, 1.35)  # squashed or not: the Kermany images were squashed to squares
    image = image.resize((max(16, int(side * aspect)), side), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    pixels = np.clip(pixels, 0, 1) ** rng.uniform(0.55, 1.8)  # gamma
    low, high = rng.uniform(0.0, 0.25), rng.uniform(0.75, 1.0)  # window / contrast
    pixels = np.clip(low + (high - low) * pixels + rng.normal(0, rng.uniform(0, 0.02), pixels.shape), 0, 1)
    image = Image.fromarray((pixels * 255).astype(np.uint8), mode="L")
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5)))
    if rng.random() < 0.15:
        image = ImageOps.equalize(image)
    if rng.random() < 0.6:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(rng.integers(15, 96)))
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("L")
    return image


def altered_film(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A chest film the model does not know how to read: turned, inverted, or a small crop of it."""
    choice = rng.integers(0, 4)
    if choice == 0:
        return image.transpose(Image.Transpose.ROTATE_90 if rng.random() < 0.5 else Image.Transpose.ROTATE_270)
    if choice == 1:
        return image.transpose(Image.Transpose.ROTATE_180)
    if choice == 2:
        return ImageOps.invert(image)
    return heavy_crop(image, rng)


def heavy_crop(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A part of 20-45 % of the film's width, enlarged to the film's size."""
    width, height = image.size
    fraction = rng.uniform(0.2, 0.45)
    crop = _random_crop(image, int(width * fraction), min(height, int(height * fraction * rng.uniform(0.7, 1.4))), rng)
    return crop.resize((width, height), Image.Resampling.BILINEAR)


def _random_crop(image: Image.Image, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    left, top = int(rng.integers(0, image.width - width + 1)), int(rng.integers(0, image.height - height + 1))
    return image.crop((left, top, left + width, top + height))


def _colour(rng: np.random.Generator, grey: bool) -> tuple[int, int, int]:
    if grey:
        return (int(rng.integers(0, 256)),) * 3
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _words(rng: np.random.Generator, count: int) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return " ".join("".join(rng.choice(list(letters), int(rng.integers(2, 10)))) for _ in range(count))


def _noise(rng, size, grey):
    width, height = size
    pixels = rng.random((height, width, 1 if grey else 3)) * 255
    image = Image.fromarray(pixels.squeeze().astype(np.uint8))
    if rng.random() < 0.6:  # smooth noise: clouds, textures, out-of-focus photos
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(1, 25)))
        image = ImageOps.autocontrast(image)
    return image


def _gradient(rng, size, grey):
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    if rng.random() < 0.5:
        angle = rng.uniform(0, 2 * np.pi)
        field_ = x * np.cos(angle) + y * np.sin(angle)
    else:
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        field_ = np.hypot(x - cx, y - cy)
    return _shaded((field_ - field_.min()) / max(float(np.ptp(field_)), 1e-6), rng, grey)


def _shaded(field_: np.ndarray, rng: np.random.Generator, grey: bool) -> Image.Image:
    """A field of 0..1 values as black to white, or as a blend between two random colours."""
    if grey:
        return Image.fromarray((field_ * 255).astype(np.uint8))
    start, end = np.array(_colour(rng, False)), np.array(_colour(rng, False))
    return Image.fromarray((start + (end - start) * field_[..., None]).astype(np.uint8))


def _document(rng, size, grey):
    paper = int(rng.integers(200, 256))
    image = Image.new("RGB", size, (paper, paper, paper) if grey or rng.random() < 0.7 else _colour(rng, False))
    draw = ImageDraw.Draw(image)
    font_size = int(rng.integers(10, 36))
    font = ImageFont.load_default(size=font_size)
    y = int(rng.integers(5, 40))
    ink = _colour(rng, grey) if rng.random() < 0.3 else (0, 0, 0)
    while y < size[1] - font_size:
        draw.text((int(rng.integers(5, 40)), y), _words(rng, int(rng.integers(3, 15))), fill=ink, font=font)
        y += int(font_size * rng.uniform(1.2, 2.0))
    return image


def _chart(rng, size, grey):
    image = Image.new("RGB", size, _colour(rng, grey) if rng.random() < 0.3 else (255, 255, 255))
    draw = ImageDraw.Draw(image)
    width, height = size
    draw.line([(40, 20), (40, height - 30), (width - 10, height - 30)], fill=(0, 0, 0), width=2)
    count = int(rng.integers(3, 20))
    if rng.random() < 0.5:  # bars
        step = (width - 60) / count
        for i in range(count):
            top = int(rng.uniform(30, height - 40))
            draw.rectangle([45 + i * step, top, 45 + (i + 0.7) * step, height - 31], fill=_colour(rng, grey))
    else:  # lines and points
        for _ in range(int(rng.integers(1, 4))):
            points = [(40 + (width - 50) * i / (count - 1), rng.uniform(25, height - 35)) for i in range(count)]
            draw.line(points, fill=_colour(rng, grey), width=int(rng.integers(1, 5)))
    draw.text((50, 5), _words(rng, 3), fill=(0, 0, 0), font=ImageFont.load_default(size=14))
    return image


def _screen(rng, size, grey):
    image = Image.new("RGB", size, _colour(rng, grey))
    draw = ImageDraw.Draw(image)
    width, height = size
    bar = int(rng.integers(20, 60))
    draw.rectangle([0, 0, width, bar], fill=_colour(rng, grey))
    title_font = ImageFont.load_default(size=max(10, bar // 2))
    draw.text((10, bar // 4), _words(rng, 4), fill=_colour(rng, grey), font=title_font)
    for _ in range(int(rng.integers(3, 15))):  # panels, buttons, fields with labels
        x0, y0 = rng.uniform(0, width * 0.8), rng.uniform(bar, height * 0.9)
        x1, y1 = x0 + rng.uniform(40, width / 2), y0 + rng.uniform(15, height / 3)
        draw.rectangle([x0, y0, x1, y1], fill=_colour(rng, grey), outline=_colour(rng, grey))
        draw.text((x0 + 5, y0 + 3), _words(rng, 2), fill=_colour(rng, grey), font=ImageFont.load_default(size=12))
    return image


def _shapes(rng, size, grey):
    image = Image.new("RGB", size, _colour(rng, grey))
    draw = ImageDraw.Draw(image)
    width, height = size
    for _ in range(int(rng.integers(2, 30))):
        x0, y0 = rng.uniform(-50, width), rng.uniform(-50, height)
        box = [x0, y0, x0 + rng.uniform(10, width / 1.5), y0 + rng.uniform(10, height / 1.5)]
        shape = rng.integers(0, 3)
        if shape == 0:
            draw.ellipse(box, fill=_colour(rng, grey) if rng.random() < 0.7 else None, outline=_colour(rng, grey), width=3)
        elif shape == 1:
            draw.rectangle(box, fill=_colour(rng, grey))
        else:
            points = [(rng.uniform(0, width), rng.uniform(0, height)) for _ in range(int(rng.integers(3, 7)))]
            draw.polygon(points, fill=_colour(rng, grey))
    return image


def _pattern(rng, size, grey):
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    period = int(rng.integers(4, 80))
    kind = rng.integers(0, 3)
    if kind == 0:
        field_ = ((x // period + y // period) % 2).astype(np.float32)
    elif kind == 1:
        field_ = (np.sin(x * 2 * np.pi / period) > 0).astype(np.float32)
    else:
        field_ = 0.5 + 0.5 * np.sin((x * rng.uniform(-1, 1) + y * rng.uniform(-1, 1)) * 2 * np.pi / period)
    return _shaded(field_, rng, grey)


SYNTHETIC_FAMILIES: dict[str, Callable] = {
    "noise": _noise, "gradient": _gradient, "document": _document, "chart": _chart,
    "screen": _screen, "shapes": _shapes, "pattern": _pattern,
}


def synthetic_image(rng: np.random.Generator, family: str | None = None, grey: bool | None = None) -> tuple[str, Image.Image]:
    """One drawn non-X-ray image (RGB or L, 96 to 900 pixels a side) and its family's name."""
    family = family or str(rng.choice(list(SYNTHETIC_FAMILIES)))
    grey = bool(rng.random() < 0.5) if grey is None else grey
    size = (int(rng.integers(96, 900)), int(rng.integers(96, 900)))
    return family, SYNTHETIC_FAMILIES[family](rng, size, grey)


def thumbnails(images: Iterable[Image.Image]) -> np.ndarray:
    return np.stack([check_input(image) for image in images])


def augmented(paths: list[Path], copies: int, rng: np.random.Generator,
               transform: Callable[[Image.Image, np.random.Generator], Image.Image] | None = None) -> Iterator[Image.Image]:
    for path in paths:
        image = load_xray(path)
        for _ in range(copies):
            altered = transform(image, rng) if transform else image
            yield source_augment(altered, rng)


def films(data_dir: str | Path, adult_dir: str | Path, rng: np.random.Generator, copies: int, adult_share: float = 1.0,
          altered_copies: int = 1) -> tuple[Iterator[Image.Image], Iterator[Image.Image], Iterator[Image.Image]]:
    """Augmented films, drawn from `rng` as they are read, in this order: `copies` of each pediatric training
    film; adult films, `adult_share` as many in all (more copies of fewer films); `altered_copies` of every
    second pediatric film and every fit-fold adult film, altered."""
    pediatric = image_files(Path(data_dir, "train"))
    adults = adult_files(adult_dir, "fit")
    adult_copies = max(1, round(adult_share * copies * len(pediatric) / max(len(adults), 1)))
    return (augmented(pediatric, copies, rng), augmented(adults, adult_copies, rng),
            augmented(pediatric[::2] + adults, altered_copies, rng, altered_film))


def training_set(data_dir: str | Path, adult_dir: str | Path, rng: np.random.Generator, copies: int = PEDIATRIC_COPIES,
                 synthetic_count: int = SYNTHETIC_COUNT) -> tuple[np.ndarray, np.ndarray]:
    """The kind model's inputs and their KINDS indices: `films` and drawn images, seen in grey as any input is."""
    pediatric, adults, altered = films(data_dir, adult_dir, rng, copies)
    drawn = (synthetic_image(rng)[1].convert("L") for _ in range(synthetic_count))
    parts = [(pediatric, PEDIATRIC), (adults, ADULT), (altered, ALTERED), (drawn, NOT_XRAY)]
    inputs, kinds = [], []
    for images, kind in parts:
        block = thumbnails(images)
        inputs.append(block)
        kinds.append(np.full(len(block), kind))
        log.info("kind model: %d %s training inputs", len(block), KINDS[kind])
    return np.concatenate(inputs), np.concatenate(kinds)


def readable(images: Iterable[Image.Image]) -> Iterator[Image.Image]:
    """source_augment stores some films smaller than the image reader accepts (MIN_SIDE); those are
    enlarged to it, the others go to the classifier as they are."""
    for image in images:
        scale = MIN_SIDE / min(image.size)
        yield image if scale <= 1 else image.resize((round(image.width * scale), round(image.height * scale)),
                                                    Image.Resampling.BICUBIC)
