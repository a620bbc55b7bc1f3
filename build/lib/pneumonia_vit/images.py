"""Reading X-ray files: one function turns any accepted upload or dataset file into an 8-bit
grayscale PIL image, or raises InvalidImageError with a message a person can act on.

data_prep, training, evaluation and the app all read images through `load_xray`, so a file that
one of them accepts is read the same way by the others. `read_xray` is the same reader that also
reports how colourful the file was before it became grey (the app's out-of-domain check).
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

LABELS = ("NORMAL", "PNEUMONIA")
DICOM_SUFFIXES = (".dcm", ".dicom")
# The one list of accepted file endings: the page's file picker, data_prep and the domain measure
# use it. The raster ones are the PIL_FORMATS below (.pgm is data_prep's cached format).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".pgm", ".tif", ".tiff", ".webp") + DICOM_SUFFIXES

# The largest Kermany original is about 2,900 px a side (8.4 MP); 50 MP leaves room for any
# chest radiograph and still refuses a decompression bomb before a single pixel is decoded.
MAX_PIXELS = 50_000_000
# Below this the lungs are a few pixels wide: nothing a classifier should be asked about.
MIN_SIDE = 64
# The raster formats Pillow may open. Anything else (EPS, PDF, ...) is refused before decoding:
# Pillow hands EPS to Ghostscript, which an upload endpoint must never run. MPO is how Pillow
# names the JPEGs many cameras and phones write; PPM is Netpbm (PGM), data_prep's cached format.
PIL_FORMATS = ("PNG", "JPEG", "MPO", "GIF", "BMP", "TIFF", "WEBP", "PPM")

_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_"),  # person123_bacteria_456.jpeg: patient 123
    re.compile(r"^((?:NORMAL2-)?IM-\d+)-"),  # IM-0115-0001.jpeg, NORMAL2-IM-0427-0001-0002.jpeg
)


class InvalidImageError(ValueError):
    """The input cannot be read as an X-ray; the message says why in plain words."""


@dataclass(frozen=True)
class XrayReading:
    """What `read_xray` returns: the grey image and how colourful the file was.

    chroma: mean of max(R, G, B) - min(R, G, B) over the decoded colour pixels, in grey levels
    (0..255); 0.0 for files stored as grayscale. A radiograph saved as an RGB JPEG (some Kermany
    originals are) reads about 0; a photograph reads tens.
    stored_size, stored_mode: the file's own width x height and Pillow mode, before any draft
    decoding or conversion (None where unknown: a PIL image passed in; the mode of a DICOM file).
    """

    image: Image.Image
    chroma: float = 0.0
    stored_size: tuple[int, int] | None = None
    stored_mode: str | None = None


def patient_id(file_name: str) -> str:
    """The patient a Kermany file belongs to; unknown naming schemes count as their own patient."""
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(file_name)
        if match:
            return match.group(1)
    return Path(file_name).stem


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Stretches high-bit-depth data (16-bit PNG, DICOM) to 0..255 over its own range."""
    pixels = pixels.astype(np.float32)
    low, high = float(pixels.min()), float(pixels.max())
    if high <= low:
        return np.zeros(pixels.shape, dtype=np.uint8)
    return np.round((pixels - low) * (255.0 / (high - low))).astype(np.uint8)


def _check_size(width: int, height: int, name: str) -> None:
    if width * height > MAX_PIXELS:
        raise InvalidImageError(
            f"{name}: image is {width}×{height} pixels ({width * height / 1e6:.0f} megapixels); the limit is "
            f"{MAX_PIXELS / 1e6:.0f} megapixels. Downscale it to at most {MAX_PIXELS / 1e6:.0f} megapixels before uploading."
        )
    if min(width, height) < MIN_SIDE:
        raise InvalidImageError(
            f"{name}: image is only {width}×{height} pixels; a chest X-ray needs at least "
            f"{MIN_SIDE} pixels a side. Upload the full-size X-ray, not a thumbnail."
        )


def _mean_chroma(rgb: np.ndarray) -> float:
    """Mean max-minus-min over the colour channels of an (..., 3) uint8 array, on at most ~256 px a side."""
    step = max(1, max(rgb.shape[:2]) // 256)
    sample = rgb[::step, ::step, :3].astype(np.int16)
    return float((sample.max(axis=-1) - sample.min(axis=-1)).mean())


def _is_dicom(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == b"DICM"


def _dicom_to_gray(data: bytes, name: str) -> XrayReading:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        dataset = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as error:  # pydicom raises many exception types for damaged files
        raise InvalidImageError(f"{name}: not a readable DICOM file ({error}).") from error
    if "PixelData" not in dataset:
        raise InvalidImageError(f"{name}: the DICOM file holds no image (no Pixel Data element).")
    try:
        rows, columns = int(dataset.Rows), int(dataset.Columns)
    except (AttributeError, TypeError, ValueError) as error:
        raise InvalidImageError(f"{name}: the DICOM file does not say its image size (Rows/Columns).") from error
    _check_size(columns, rows, name)
    try:
        pixels = dataset.pixel_array
    except Exception as error:
        raise InvalidImageError(f"{name}: the DICOM pixel data cannot be decoded ({error}).") from error
    samples = int(dataset.get("SamplesPerPixel") or 1)
    if pixels.ndim == (4 if samples > 1 else 3):
        pixels = pixels[0]  # a multi-frame series: the first frame is the radiograph
    chroma = 0.0
    if pixels.ndim == 3:
        chroma = _mean_chroma(_to_uint8(pixels[..., :3]))
        pixels = pixels.mean(axis=-1)
    if pixels.ndim != 2:
        raise InvalidImageError(f"{name}: the DICOM pixel data has an unexpected shape {pixels.shape}.")
    try:
        pixels = apply_voi_lut(apply_modality_lut(pixels, dataset), dataset)
    except Exception as error:  # a damaged or inconsistent LUT
        raise InvalidImageError(f"{name}: the DICOM grey-level tables cannot be applied ({error}).") from error
    gray = _to_uint8(pixels)
    if dataset.get("PhotometricInterpretation") == "MONOCHROME1":
        gray = 255 - gray  # MONOCHROME1 stores bone dark; the model was trained on bone bright
    return XrayReading(Image.fromarray(gray, mode="L"), chroma, (columns, rows))


def _pil_to_gray(image: Image.Image, name: str, draft_size: int | None) -> XrayReading:
    _check_size(*image.size, name)
    if draft_size and image.format == "JPEG":
        # Let libjpeg decode at 1/2, 1/4 or 1/8 scale while staying at least draft_size a side.
        image.draft("L", (draft_size, draft_size))
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise InvalidImageError(
            f"{name}: the image data is damaged or truncated ({error}). Upload the file again, or export it anew."
        ) from error
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)  # animated GIF/PNG: only the first frame is used
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return XrayReading(Image.fromarray(_to_uint8(np.asarray(image)), mode="L"))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent areas become black, the colour of the air around a chest on a radiograph.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    chroma = 0.0
    if image.mode not in ("L", "1"):
        rgb = image.convert("RGB")
        chroma = _mean_chroma(np.asarray(rgb))
        image = rgb.convert("L")
    elif image.mode == "1":
        image = image.convert("L")
    return XrayReading(image, chroma)


def load_xray(source: str | os.PathLike | bytes | Image.Image, draft_size: int | None = None) -> Image.Image:
    """Reads a PNG, JPEG, GIF, DICOM file (path or bytes) or a PIL image as 8-bit grayscale.

    EXIF rotation is applied. `draft_size` lets JPEG decoding skip detail that a later resize to
    that size would discard anyway. Raises InvalidImageError for anything that is not a usable image.
    """
    return read_xray(source, draft_size).image


def read_xray(source: str | os.PathLike | bytes | Image.Image, draft_size: int | None = None) -> XrayReading:
    """`load_xray` that also reports the file's colourfulness (`XrayReading.chroma`).

    With `draft_size`, libjpeg decodes a colour JPEG straight to grey, so its chroma reads 0:
    leave `draft_size` out where the colour matters (the app does).
    """
    if isinstance(source, Image.Image):
        return _pil_to_gray(source, "image", draft_size)
    if isinstance(source, bytes):
        name, data = "upload", source
    else:
        name = Path(source).name
        try:
            data = Path(source).read_bytes()
        except FileNotFoundError as error:
            raise InvalidImageError(f"{source}: no such file.") from error
        except IsADirectoryError as error:
            raise InvalidImageError(f"{source}: is a folder, not an image file.") from error
    if not data:
        raise InvalidImageError(f"{name}: the file is empty.")
    if _is_dicom(data) or name.lower().endswith(DICOM_SUFFIXES):
        return _dicom_to_gray(data, name)
    try:
        Image.init()  # registers every plugin; Image.open(formats=...) alone sees only the first few
        image = Image.open(io.BytesIO(data), formats=[fmt for fmt in PIL_FORMATS if fmt in Image.OPEN])
    except Image.DecompressionBombError as error:
        # Pillow refuses far beyond MAX_PIXELS; its own text would cite a second, larger limit.
        raise InvalidImageError(
            f"{name}: image is too large: more than the limit of {MAX_PIXELS / 1e6:.0f} megapixels. "
            f"Downscale it to at most {MAX_PIXELS / 1e6:.0f} megapixels before uploading."
        ) from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise InvalidImageError(
            f"{name}: not a readable image. Upload a PNG, JPEG or DICOM (.dcm) chest X-ray."
        ) from error
    stored_size, stored_mode = image.size, image.mode  # before draft decoding changes them
    reading = _pil_to_gray(image, name, draft_size)
    gray = ImageOps.exif_transpose(reading.image) if "exif" in image.info else reading.image
    return XrayReading(gray, reading.chroma, stored_size, stored_mode)
