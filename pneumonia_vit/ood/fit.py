"""Fitting the out-of-domain rules that need data (pneumonia_vit/domain.py runs them):

- the kind model (rule 3), independent of the pneumonia model, so a retrained classifier keeps it:

      python -m pneumonia_vit.domain_fit MODEL_DIR --data_dir data/chest_xray_prepared \\
          --adult_dir ../shared/data/adult_cxr_224 --kind_model

- what belongs to one trained classifier: the feature statistics (rule 4; train_vit.py fits them at
  the end of training) and, given the adult images, the child score on the same features that rule 3
  adds to the kind model's (`fit_child_score`; it needs the kind model in MODEL_DIR):

      python -m pneumonia_vit.domain_fit MODEL_DIR --data_dir data/chest_xray_prepared \\
          --adult_dir ../shared/data/adult_cxr_224 --feature_stats

The kind model learns four kinds of image (domain.KINDS), never from the test split:
- pediatric chest X-rays: the prepared train split;
- adult chest X-rays: NIH ChestX-ray14 images (adult_cxr_224/) of the patients in the "fit" part of
  `adult_fold` (60 % of patients; "select", 20 %, was looked at while choosing the design and sets
  the child score's weight, and "held_out", 20 %, is read only by domain_measure.py);
- altered chest films: train-split and fit-part adult films rotated 90/180/270 degrees, inverted
  or cropped to a small part;
- not an X-ray: images drawn here (`synthetic_image`): noise, gradients, text pages, charts,
  interface-like screens, shapes, patterns, each grey or in colour.
Every X-ray passes through `source_augment` first: random crop, aspect change, down- and
up-sampling, contrast, gamma, blur and JPEG compression. These vary what differs between
hospitals and scanners (exposure, processing, resolution, compression), so that the model learns
the anatomy and the layout of the film rather than how NIH's files look. The cut-off on
P(pediatric chest X-ray) is the `quantile` (1 %) of the pediatric validation split's values.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps

from .domain import CHECK_SIDE, DEFAULT_QUANTILE, KINDS, DomainStats, KindModel, check_input, kind_score
from .images import IMAGE_SUFFIXES, MIN_SIDE, load_xray
from .preprocess import PixelSpec, pixel_values

log = logging.getLogger(__name__)

PEDIATRIC, ADULT, ALTERED, NOT_XRAY = range(len(KINDS))
KIND_QUANTILE = 0.01  # share of the pediatric validation split the cut-off flags
WIDTH = 8  # kind_network's first convolution's channels
EPOCHS = 12
BATCH = 128
PEDIATRIC_COPIES = 2  # augmented copies of each pediatric training film (and as many adult inputs)
SYNTHETIC_COUNT = 6000
SEED = 2024
# The child score's fit: augmented copies of each pediatric training film (the other kinds in proportion);
# with one copy, the adult-fold recall moved with the random draw of augmentations.
CHILD_SCORE_COPIES = 2
CHILD_SCORE_SEED = SEED + 1  # not the kind model's draws: the two opinions should not share their errors
ADULT_FOLDS = (("fit", 60), ("select", 20), ("held_out", 20))  # percent of NIH patients


# ---- data -----------------------------------------------------------------------------------------

def image_files(folder: str | Path) -> list[Path]:
    return sorted(path for path in Path(folder).rglob("*") if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)


def adult_fold(patient_id: str) -> str:
    """A patient's fold, fixed by a hash of the NIH patient id: all of a patient's images on one
    side, the same folds in every run and in domain_measure.py."""
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
    """A grey X-ray as another hospital might have stored it (see the module docstring)."""
    width, height = image.size
    scale = rng.uniform(0.8, 1.0)
    crop_w, crop_h = int(width * scale * rng.uniform(0.92, 1.0)), int(height * scale * rng.uniform(0.92, 1.0))
    left, top = int(rng.integers(0, width - crop_w + 1)), int(rng.integers(0, height - crop_h + 1))
    image = image.crop((left, top, left + crop_w, top + crop_h))
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
    crop_w, crop_h = int(width * fraction), min(height, int(height * fraction * rng.uniform(0.7, 1.4)))
    left, top = int(rng.integers(0, width - crop_w + 1)), int(rng.integers(0, height - crop_h + 1))
    return image.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), Image.Resampling.BILINEAR)


def _colour(rng: np.random.Generator, grey: bool) -> tuple[int, int, int]:
    if grey:
        level = int(rng.integers(0, 256))
        return (level, level, level)
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _words(rng: np.random.Generator, count: int) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return " ".join("".join(rng.choice(list(letters), int(rng.integers(2, 10)))) for _ in range(count))


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _noise(rng, size, grey):
    width, height = size
    channels = 1 if grey else 3
    pixels = rng.random((height, width, channels)) * 255
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
    field_ = (field_ - field_.min()) / max(float(np.ptp(field_)), 1e-6)
    if grey:
        return Image.fromarray((field_ * 255).astype(np.uint8))
    start, end = np.array(_colour(rng, False)), np.array(_colour(rng, False))
    return Image.fromarray((start + (end - start) * field_[..., None]).astype(np.uint8))


def _document(rng, size, grey):
    paper = int(rng.integers(200, 256))
    image = Image.new("RGB", size, (paper, paper, paper) if grey or rng.random() < 0.7 else _colour(rng, False))
    draw = ImageDraw.Draw(image)
    font_size = int(rng.integers(10, 36))
    font = _font(font_size)
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
    draw.text((50, 5), _words(rng, 3), fill=(0, 0, 0), font=_font(14))
    return image


def _screen(rng, size, grey):
    image = Image.new("RGB", size, _colour(rng, grey))
    draw = ImageDraw.Draw(image)
    width, height = size
    bar = int(rng.integers(20, 60))
    draw.rectangle([0, 0, width, bar], fill=_colour(rng, grey))
    draw.text((10, bar // 4), _words(rng, 4), fill=_colour(rng, grey), font=_font(max(10, bar // 2)))
    for _ in range(int(rng.integers(3, 15))):  # panels, buttons, fields with labels
        x0, y0 = rng.uniform(0, width * 0.8), rng.uniform(bar, height * 0.9)
        x1, y1 = x0 + rng.uniform(40, width / 2), y0 + rng.uniform(15, height / 3)
        draw.rectangle([x0, y0, x1, y1], fill=_colour(rng, grey), outline=_colour(rng, grey))
        draw.text((x0 + 5, y0 + 3), _words(rng, 2), fill=_colour(rng, grey), font=_font(12))
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
    if grey:
        return Image.fromarray((field_ * 255).astype(np.uint8))
    a, b = np.array(_colour(rng, False)), np.array(_colour(rng, False))
    return Image.fromarray((a + (b - a) * field_[..., None]).astype(np.uint8))


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


# ---- the kind model --------------------------------------------------------------------------------

def _inputs(images: Iterable[Image.Image]) -> np.ndarray:
    return np.stack([check_input(image) for image in images])


def _augmented(paths: list[Path], copies: int, rng: np.random.Generator,
               transform: Callable[[Image.Image, np.random.Generator], Image.Image] | None = None) -> Iterator[Image.Image]:
    for path in paths:
        image = load_xray(path)
        for _ in range(copies):
            altered = transform(image, rng) if transform else image
            yield source_augment(altered, rng)


def training_set(data_dir: Path, adult_dir: Path, rng: np.random.Generator, copies: int = PEDIATRIC_COPIES,
                 synthetic_count: int = SYNTHETIC_COUNT) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and KINDS indices for the fit: `copies` augmented copies of each pediatric training
    film, as many adult inputs (more copies of fewer films), altered films (every second pediatric
    film and every fit-fold adult film), drawn images."""
    pediatric = image_files(data_dir / "train")
    adults = adult_files(adult_dir, "fit")
    parts = [
        (_augmented(pediatric, copies, rng), PEDIATRIC),
        (_augmented(adults, max(1, round(copies * len(pediatric) / max(len(adults), 1))), rng), ADULT),
        (_augmented(pediatric[::2] + adults, 1, rng, altered_film), ALTERED),  # as many as the drawn images
        ((_grey_or_colour(synthetic_image(rng)[1]) for _ in range(synthetic_count)), NOT_XRAY),
    ]
    inputs, kinds = [], []
    for images, kind in parts:
        block = _inputs(images)
        inputs.append(block)
        kinds.append(np.full(len(block), kind))
        log.info("kind model: %d %s training inputs", len(block), KINDS[kind])
    return np.concatenate(inputs), np.concatenate(kinds)


def _grey_or_colour(image: Image.Image) -> Image.Image:
    """What the kind model sees of any image: its grey version (load_xray's conversion)."""
    return image.convert("L")


def kind_network(width: int = WIDTH):
    """The kind model's layers for training: four 3x3 convolution blocks (width, 2, 4, 4 x width
    channels, each halving the side) keep where things are in the film (lungs, arms, labels, a turned
    film's layout), then one hidden layer and a logit per KINDS entry."""
    from torch import nn

    layers, channels = [], 1
    for out in (width, 2 * width, 4 * width, 4 * width):
        layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
        channels = out
    side = CHECK_SIDE // 16
    return nn.Sequential(*layers, nn.Flatten(), nn.Dropout(0.3), nn.Linear(channels * side * side, 128), nn.ReLU(),
                         nn.Linear(128, len(KINDS)))


def kind_tensors(network) -> dict[str, np.ndarray]:
    """A trained kind_network as KindModel runs it: each batch norm folded into its convolution."""
    from torch import nn

    modules, tensors = list(network), {}
    convolutions = [(m, modules[i + 1]) for i, m in enumerate(modules) if isinstance(m, nn.Conv2d)]
    for index, (convolution, norm) in enumerate(convolutions):
        scale = (norm.weight / (norm.running_var + norm.eps).sqrt()).detach()
        tensors[f"conv{index}.weight"] = (convolution.weight.detach() * scale[:, None, None, None]).numpy()
        tensors[f"conv{index}.bias"] = ((convolution.bias.detach() - norm.running_mean) * scale + norm.bias.detach()).numpy()
    hidden, output = (m for m in modules if isinstance(m, nn.Linear))
    for name, linear in (("hidden", hidden), ("output", output)):
        tensors[f"{name}.weight"], tensors[f"{name}.bias"] = linear.weight.detach().numpy(), linear.bias.detach().numpy()
    return {name: np.ascontiguousarray(array, dtype=np.float32) for name, array in tensors.items()}


def train_kind_network(inputs: np.ndarray, kinds: np.ndarray, width: int = WIDTH, epochs: int = EPOCHS,
                       seed: int = SEED):
    """kind_network trained on (N, 1, side, side) thumbnails and their KINDS indices: class-balanced
    cross-entropy, AdamW with a one-cycle schedule, mirrored and slightly shifted copies (a mirrored
    or reframed film is still the same kind). The same seed and thread count give the same weights."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    network = kind_network(width)
    images, targets = torch.from_numpy(inputs), torch.from_numpy(kinds).long()
    counts = np.bincount(kinds, minlength=len(KINDS))
    balance = torch.tensor(len(kinds) / (len(KINDS) * np.maximum(counts, 1)), dtype=torch.float32)
    loss_function = nn.CrossEntropyLoss(weight=balance, label_smoothing=0.05)
    optimizer = torch.optim.AdamW(network.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * -(-len(targets) // BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    network.train()
    for epoch in range(epochs):
        order, total = torch.randperm(len(targets), generator=generator), 0.0
        for start in range(0, len(targets), BATCH):
            index = order[start:start + BATCH]
            batch = images[index]
            mirrored = torch.rand(len(index), generator=generator) < 0.5
            batch = torch.where(mirrored[:, None, None, None], batch.flip(-1), batch)
            batch = torch.roll(batch, torch.randint(-3, 4, (2,), generator=generator).tolist(), dims=(2, 3))
            loss = loss_function(network(batch), targets[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(index)
        log.info("kind model: epoch %d of %d, loss %.4f", epoch + 1, epochs, total / len(targets))
    return network.eval()


def fit_kind_model(data_dir: str | Path, adult_dir: str | Path, output_dir: str | Path | None = None,
                   quantile: float = KIND_QUANTILE, width: int = WIDTH, epochs: int = EPOCHS, seed: int = SEED,
                   copies: int = PEDIATRIC_COPIES, synthetic_count: int = SYNTHETIC_COUNT) -> KindModel:
    """Fits rule 3 (see the module docstring) and, with `output_dir`, saves it there. `copies` and
    `synthetic_count` size the training set (training_set); tests fit smaller ones."""
    data_dir, adult_dir = Path(data_dir), Path(adult_dir)
    rng = np.random.default_rng(seed)
    inputs, kinds = training_set(data_dir, adult_dir, rng, copies, synthetic_count)
    counts = np.bincount(kinds, minlength=len(KINDS))
    model = KindModel(tensors=kind_tensors(train_kind_network(inputs, kinds, width, epochs, seed)), threshold=0.0)
    validation = _inputs(load_xray(path) for path in image_files(data_dir / "validation"))
    p_pediatric = model.probabilities(validation)[:, PEDIATRIC]
    model.threshold = float(np.quantile(p_pediatric, quantile))
    model.metadata = {
        "quantile": repr(quantile), "seed": str(seed), "width": str(width), "epochs": str(epochs),
        "training_inputs": ",".join(f"{kind}={count}" for kind, count in zip(KINDS, counts)),
        "validation_count": str(len(validation)), "adult_folds": ",".join(f"{n}={p}" for n, p in ADULT_FOLDS),
    }
    log.info("kind model: cut-off P(pediatric) < %.4f = %.1f%% quantile of %d validation images",
             model.threshold, 100 * quantile, len(validation))
    if output_dir is not None:
        log.info("kind model saved to %s", model.save(output_dir))
    return model


# ---- what belongs to one classifier: rule 4's statistics, rule 3's child score ---------------------

def _split_images(source, batch_size: int) -> Iterator[Image.Image]:
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
        for image in _split_images(images, batch_size):
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
    """Fits rule 4 on the training split and sets its cut-off on the validation split.

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
        log.info("domain stats: %d training embeddings, cut-off %.2f = %.1f%% quantile of %d validation distances -> %s",
                 stats.train_count, stats.threshold, 100 * quantile, stats.validation_count, path)
    return stats


def _readable(images: Iterable[Image.Image]) -> Iterator[Image.Image]:
    """source_augment stores some films smaller than the image reader accepts (MIN_SIDE); those are
    enlarged to it, the others go to the classifier as they are."""
    for image in images:
        scale = MIN_SIDE / min(image.size)
        yield image if scale <= 1 else image.resize((round(image.width * scale), round(image.height * scale)),
                                                    Image.Resampling.BICUBIC)


def fit_child_score(model, spec: PixelSpec, stats: DomainStats, kind_model: KindModel, data_dir: str | Path,
                    adult_dir: str | Path, copies: int = CHILD_SCORE_COPIES, seed: int = CHILD_SCORE_SEED,
                    batch_size: int = 64) -> DomainStats:
    """Fits rule 3's second opinion into `stats` (domain.py's docstring): a logistic regression on the
    classifier's features of source-augmented films, pediatric training films against fit-fold adult
    films and altered films (turned, inverted, cropped), as the kind model sees them; its weight beside
    the kind model; the cut-off on the combined score at the kind model's validation quantile."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    data_dir, adult_dir = Path(data_dir), Path(adult_dir)
    rng = np.random.default_rng(seed)
    pediatric = image_files(data_dir / "train")
    adults = adult_files(adult_dir, "fit")
    adult_copies = max(1, round(0.6 * copies * len(pediatric) / max(len(adults), 1)))
    children = embed(model, spec, _readable(_augmented(pediatric, copies, rng)), batch_size)
    others = np.concatenate([
        embed(model, spec, _readable(_augmented(adults, adult_copies, rng)), batch_size),
        embed(model, spec, _readable(_augmented(pediatric[::2] + adults, copies, rng, altered_film)), batch_size),
    ])
    features = np.concatenate([children, others])
    is_child = np.r_[np.ones(len(children)), np.zeros(len(others))]
    scaler = StandardScaler().fit(features)
    regression = LogisticRegression(C=1.0, max_iter=3000, class_weight="balanced").fit(scaler.transform(features), is_child)
    stats.child_weight = regression.coef_[0] / scaler.scale_  # the standardisation folded into the weights
    stats.child_bias = float(regression.intercept_[0] - stats.child_weight @ scaler.mean_)

    # The weight of the child score beside the kind model's logit, from films neither was fitted on
    # (validation children, select-fold adults): the regression's scale follows the draw of augmentations.
    def scores(paths: list[Path]) -> np.ndarray:
        p_pediatric = kind_model.probabilities(_inputs(load_xray(path) for path in paths))[:, PEDIATRIC]
        return np.c_[kind_score(p_pediatric, 0.0), stats.child_score(embed(model, spec, paths, batch_size))]

    validation, select = image_files(data_dir / "validation"), adult_files(adult_dir, "select")
    if not select:
        raise ValueError(f"{adult_dir}: no adult images in the select fold, which sets the child score's weight")
    validation_scores, select_scores = scores(validation), scores(select)
    balance = LogisticRegression(class_weight="balanced").fit(
        np.r_[validation_scores, select_scores], np.r_[np.ones(len(validation)), np.zeros(len(select))])
    weight = max(float(balance.coef_[0][1]), 0.0) / max(float(balance.coef_[0][0]), 1e-6)
    stats.child_weight, stats.child_bias = weight * stats.child_weight, weight * stats.child_bias
    combined = validation_scores[:, 0] + weight * validation_scores[:, 1]
    quantile = float(kind_model.metadata.get("quantile", KIND_QUANTILE))
    stats.kind_cutoff = float(np.quantile(combined, quantile))
    stats.kind_model_fingerprint = kind_model.fingerprint
    log.info("child score: %d pediatric and %d adult or altered films, weight %.3f beside the kind model; combined "
             "cut-off %.3f = %.1f%% quantile of %d validation images", len(children), len(others), weight,
             stats.kind_cutoff, 100 * quantile, len(validation))
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pneumonia_vit.domain_fit",
        description="Fit the out-of-domain check's kind model (with --adult_dir) and/or the model's feature "
                    "statistics (--feature_stats), and save them in the model folder.",
    )
    parser.add_argument("model_dir", help="the model folder to save into")
    parser.add_argument("--data_dir", required=True, help="prepared data (train/ and validation/ folders)")
    parser.add_argument("--adult_dir", help="adult_cxr_224/ (images/ and provenance.csv): for --kind_model, and for "
                                            "--feature_stats the child score rule 3 adds to the kind model's")
    parser.add_argument("--kind_model", action="store_true", help="fit the kind model (rule 3; needs --adult_dir)")
    parser.add_argument("--feature_stats", action="store_true",
                        help="fit the Mahalanobis statistics of the classifier in model_dir (rule 4) and, with "
                             "--adult_dir, its child score (rule 3, with the kind model in model_dir)")
    parser.add_argument("--quantile", type=float, default=None,
                        help=f"validation quantile of the cut-off (default {KIND_QUANTILE} for the kind model, "
                             f"{DEFAULT_QUANTILE} for the feature statistics)")
    parser.add_argument("--copies", type=int, default=PEDIATRIC_COPIES,
                        help="augmented copies of each pediatric training film in the kind model's fit")
    parser.add_argument("--synthetic_count", type=int, default=SYNTHETIC_COUNT,
                        help="drawn non-X-ray images in the kind model's fit")
    parser.add_argument("--batch_size", type=int, default=64, help="images per forward for --feature_stats")
    args = parser.parse_args(argv)
    if not args.kind_model and not args.feature_stats:
        parser.error("give --kind_model, --feature_stats, or both")
    if args.kind_model and not args.adult_dir:
        parser.error("--kind_model needs --adult_dir (the adult chest X-rays it learns to tell apart)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.kind_model:
        fit_kind_model(args.data_dir, args.adult_dir, args.model_dir,
                       quantile=KIND_QUANTILE if args.quantile is None else args.quantile,
                       copies=args.copies, synthetic_count=args.synthetic_count)
        previous = DomainStats.load(args.model_dir)
        if not args.feature_stats and previous is not None and previous.child_weight is not None:
            log.warning("the child score in %s was set with the previous kind model: rule 3 uses the new kind model "
                        "alone until you refit it (--feature_stats --adult_dir)", args.model_dir)
    if args.feature_stats:
        from .data import load_splits
        from .model import Classifier

        classifier = Classifier.load(args.model_dir, fast=False)  # the features the app computes: fp32 PyTorch
        splits = load_splits(args.data_dir)
        stats = fit_domain_stats(classifier.model, classifier.spec, splits["train"], splits["validation"],
                                 batch_size=args.batch_size,
                                 quantile=DEFAULT_QUANTILE if args.quantile is None else args.quantile)
        if args.adult_dir:
            kind_model = KindModel.load(args.model_dir)
            if kind_model is None:
                parser.error(f"the child score is added to the kind model's, and {args.model_dir} has none: "
                             "fit it first (--kind_model) or copy domain_check.safetensors there")
            fit_child_score(classifier.model, classifier.spec, stats, kind_model, args.data_dir, args.adult_dir,
                            batch_size=args.batch_size)
        else:
            log.info("no --adult_dir: rule 3 uses the kind model alone")
        log.info("domain stats saved to %s", stats.save(args.model_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
