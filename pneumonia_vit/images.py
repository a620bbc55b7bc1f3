"""The one reader of X-ray files for every entry point (data_prep, training, evaluation, the app): any
accepted file becomes an 8-bit grey PIL image, or an InvalidImageError with a message a person can act on.
"""

from __future__ import annotations

import ctypes
import io
import math
import os
import re
import sys
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

LABELS = ("NORMAL", "PNEUMONIA")
DICOM_SUFFIXES = (".dcm", ".dicom")
# The one list of accepted file endings; the raster ones are the PIL_FORMATS below.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".pgm", ".tif", ".tiff", ".webp") + DICOM_SUFFIXES

# Room for any chest radiograph, while a decompression bomb is refused before a single pixel is decoded.
MAX_PIXELS = 50_000_000
# Below this the lungs are a few pixels wide: nothing a classifier should be asked about.
MIN_SIDE = 64
# An image with a side over REDUCE_ABOVE px is box-reduced by a whole factor to at most WORKING_SIDE px a
# side before any colour, alpha or grey conversion: neither the model nor the page needs more.
REDUCE_ABOVE = 4096
WORKING_SIDE = 2048
# One DICOM frame decoded, at most: MAX_PIXELS of 16-bit grey. A deflated data set may inflate to
# anything: its header is inflated and checked first, then the rest up to one such frame plus that header.
MAX_FRAME_BYTES = 2 * MAX_PIXELS
DICOM_HEADER_BYTES = 1 << 20
MAX_INFLATED_BYTES = MAX_FRAME_BYTES + DICOM_HEADER_BYTES
# A decode holds the decoded pixels (up to 4 bytes each), the grey result and strip-sized copies. Above
# LARGE_PIXELS (more than any Kermany original) it waits for one of MAX_LARGE_DECODES slots, which bounds
# the memory of concurrent large decodes; smaller images never wait.
LARGE_PIXELS = 12_000_000
MAX_LARGE_DECODES = 2
_LARGE_DECODE_SLOTS = threading.BoundedSemaphore(MAX_LARGE_DECODES)
# The raster formats Pillow may open: anything else is refused before decoding (Pillow hands EPS to
# Ghostscript, which an upload endpoint must never run). MPO is Pillow's name for many cameras' JPEGs; PPM reads PGM.
PIL_FORMATS = ("PNG", "JPEG", "MPO", "GIF", "BMP", "TIFF", "WEBP", "PPM")
HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I", "F")

_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_"),  # person123_bacteria_456.jpeg: patient 123
    re.compile(r"^((?:NORMAL2-)?IM-\d+)-"),  # IM-0115-0001.jpeg, NORMAL2-IM-0427-0001-0002.jpeg
)


class InvalidImageError(ValueError):
    """The input cannot be read as an X-ray; the message says why in plain words."""


@dataclass(frozen=True)
class XrayReading:
    """What `read_xray` returns: the grey image and what the file was before it became grey.

    chroma: mean of max(R, G, B) - min(R, G, B) over the decoded pixels, in grey levels (0.0 for a grey file).
    stored_size, stored_mode: the file's own width x height and Pillow mode, before any draft decoding,
    reduction or conversion (None where unknown: a PIL image passed in; the mode of a DICOM file).
    transparency: the fraction of pixels with alpha < 255 (composited onto black), sampled like chroma.
    """

    image: Image.Image
    chroma: float = 0.0
    stored_size: tuple[int, int] | None = None
    stored_mode: str | None = None
    transparency: float = 0.0


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
    pixels -= low  # in place: one float copy of the image, not three
    pixels *= 255.0 / (high - low)
    return np.round(pixels, out=pixels).astype(np.uint8)


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


def _chroma_sum(rgb: np.ndarray, step: int) -> tuple[int, int]:
    """The sum of max(R, G, B) - min(R, G, B) over an (..., 3) uint8 array's pixels sampled every `step`, and their count."""
    sample = rgb[::step, ::step, :3].astype(np.int16)
    red, green, blue = sample[..., 0], sample[..., 1], sample[..., 2]  # faster than reducing an axis of 3
    spread = np.maximum(np.maximum(red, green), blue) - np.minimum(np.minimum(red, green), blue)
    return int(spread.sum()), spread.size


def _reduction(width: int, height: int) -> int:
    """The whole factor an image is reduced by (1: read as it is)."""
    return 1 if max(width, height) <= REDUCE_ABOVE else math.ceil(max(width, height) / WORKING_SIDE)


def _box_reduce(pixels: np.ndarray, factor: int) -> np.ndarray:
    """Means of factor x factor blocks (a last partial row or column of blocks dropped), as float32,
    summed one block offset at a time so that no full-size float copy is made."""
    rows, columns = pixels.shape[0] // factor, pixels.shape[1] // factor
    total = np.zeros((rows, columns, *pixels.shape[2:]), np.float32)
    for i in range(factor):
        for j in range(factor):
            total += pixels[i : rows * factor : factor, j : columns * factor : factor]
    return total / (factor * factor)


def release_freed_memory() -> None:
    """Hands the pages of freed large buffers back to the system: glibc would keep part of them in the
    arena of the thread that freed them, resident after the request."""
    if sys.platform.startswith("linux"):
        with suppress(OSError, AttributeError):  # a libc without malloc_trim (musl)
            ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextmanager
def _decode_slot(pixels: int) -> Iterator[None]:
    """Waits for one of MAX_LARGE_DECODES slots when decoding more than LARGE_PIXELS."""
    if pixels <= LARGE_PIXELS:
        yield
        return
    try:
        with _LARGE_DECODE_SLOTS:
            yield
    finally:
        release_freed_memory()


def _frame_bytes(header, name: str) -> int:
    """The decoded size of one frame, once the stated image size is within the limits."""
    try:
        rows, columns = int(header.Rows), int(header.Columns)
    except (AttributeError, TypeError, ValueError) as error:
        raise InvalidImageError(f"{name}: the DICOM file does not say its image size (Rows/Columns).") from error
    _check_size(columns, rows, name)
    samples, bits = int(header.get("SamplesPerPixel") or 1), int(header.get("BitsAllocated") or 16)
    frame_bytes = rows * columns * samples * math.ceil(bits / 8)
    if frame_bytes > MAX_FRAME_BYTES:
        raise InvalidImageError(
            f"{name}: one frame of this DICOM image takes {frame_bytes / 1e6:.0f} MB decoded ({samples} samples of "
            f"{bits} bits a pixel); the limit is {MAX_FRAME_BYTES / 1e6:.0f} MB. Export it as 8- or 16-bit grey, or "
            f"downscale it, before uploading."
        )
    return frame_bytes


def _inflated(deflated: bytes, name: str) -> bytes:
    """The data set of a deflated DICOM file inflated: its header first, and the rest only if what the
    header states (size, frames) and what actually comes out both stay within MAX_INFLATED_BYTES."""
    from pydicom.filereader import read_dataset

    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    too_large = (f"{name}: the deflated DICOM data set inflates to more than {MAX_INFLATED_BYTES / 1e6:.0f} MB, the "
                 f"limit. Export the first frame alone, uncompressed or as PNG, and upload that.")
    try:
        head = inflater.decompress(deflated, DICOM_HEADER_BYTES)
        header = read_dataset(io.BytesIO(head), False, True, stop_when=lambda tag, vr, length: tag == 0x7FE00010)
        if "Rows" in header:
            if _frame_bytes(header, name) * int(header.get("NumberOfFrames") or 1) > MAX_INFLATED_BYTES:
                raise InvalidImageError(too_large)
        rest = inflater.decompress(inflater.unconsumed_tail, MAX_INFLATED_BYTES - len(head) + 1)
    except zlib.error as error:
        raise InvalidImageError(f"{name}: the deflated DICOM data set is damaged ({error}).") from error
    if len(head) + len(rest) > MAX_INFLATED_BYTES:
        raise InvalidImageError(too_large)
    return head + rest


def _read_dicom(data: bytes, name: str):
    """The data set, its pixel data still encoded; a deflated one inflated within MAX_INFLATED_BYTES
    (pydicom would inflate all of it at once, whatever its size)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.filereader import read_dataset, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

    try:
        stream = io.BytesIO(data)
        read_preamble(stream, force=True)
        meta = read_dataset(stream, is_implicit_VR=False, is_little_endian=True,
                            stop_when=lambda tag, vr, length: tag.group != 2)
        if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            return pydicom.dcmread(io.BytesIO(data), force=True)
        with _decode_slot(MAX_PIXELS):  # inflating may take MAX_INFLATED_BYTES: a large decode
            dataset = read_dataset(io.BytesIO(_inflated(data[stream.tell() :], name)), False, True)
    except InvalidImageError:
        raise
    except Exception as error:  # pydicom raises many exception types for damaged files
        raise InvalidImageError(f"{name}: not a readable DICOM file ({error}).") from error
    dataset.file_meta = FileMetaDataset(meta)
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian  # what the inflated bytes are
    return dataset


def _check_decoder(dataset, name: str) -> None:
    from pydicom.pixels import get_decoder

    syntax = getattr(dataset, "file_meta", {}).get("TransferSyntaxUID")
    if syntax is None or not syntax.is_compressed:
        return
    with suppress(NotImplementedError):  # pydicom knows no decoder at all for this syntax
        if get_decoder(syntax).is_available:
            return
    raise InvalidImageError(
        f"{name}: the DICOM pixel data is compressed as {syntax.name}, which this app cannot decode. "
        f"Export it uncompressed (Explicit VR Little Endian), as JPEG or JPEG 2000 DICOM, or as PNG."
    )


def _dicom_to_gray(data: bytes, name: str) -> XrayReading:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    dataset = _read_dicom(data, name)
    if "PixelData" not in dataset:
        raise InvalidImageError(f"{name}: the DICOM file holds no image (no Pixel Data element).")
    _frame_bytes(dataset, name)
    _check_decoder(dataset, name)
    rows, columns = int(dataset.Rows), int(dataset.Columns)
    with _decode_slot(rows * columns):
        dataset.pixel_array_options(index=0)  # a multi-frame series: only the first frame, the radiograph
        try:
            pixels = dataset.pixel_array
        except Exception as error:
            raise InvalidImageError(f"{name}: the DICOM pixel data cannot be decoded ({error}).") from error
        del dataset.PixelData  # the encoded copy, no longer needed
        factor = _reduction(columns, rows)
        if factor > 1:
            pixels = _box_reduce(pixels, factor)
        chroma = 0.0
        if pixels.ndim == 3:
            chroma_sum, samples = _chroma_sum(_to_uint8(pixels[..., :3]), max(1, max(pixels.shape[:2]) // 256))
            chroma = chroma_sum / samples
            pixels = pixels.mean(axis=-1)
        if pixels.ndim != 2:
            raise InvalidImageError(f"{name}: the DICOM pixel data has an unexpected shape {pixels.shape}.")
        try:
            pixels = apply_voi_lut(apply_modality_lut(pixels, dataset), dataset)
        except Exception as error:  # a damaged or inconsistent LUT
            raise InvalidImageError(f"{name}: the DICOM grey-level tables cannot be applied ({error}).") from error
        gray = _to_uint8(pixels)
        del pixels
    if dataset.get("PhotometricInterpretation") == "MONOCHROME1":
        gray = 255 - gray  # MONOCHROME1 stores bone dark; the model was trained on bone bright
    return XrayReading(Image.fromarray(gray, mode="L"), chroma, (columns, rows))


def _decoded(image: Image.Image, name: str, draft_size: int | None) -> Image.Image:
    """The first frame of `image` decoded (a multi-page file's other pages are never read), box-reduced
    to WORKING_SIDE where larger: a new image then, the full-size one left to the caller to close."""
    factor = _reduction(*image.size)
    if image.format == "JPEG":
        # libjpeg decodes at 1/2, 1/4 or 1/8 scale while staying at least the size asked for.
        if draft_size:  # straight to grey: detail that a later resize to draft_size discards is skipped
            image.draft("L", (draft_size, draft_size))
        elif factor > 1:  # a large image: in its own colours, at least its working size
            image.draft(image.mode, (image.width // factor, image.height // factor))
        if factor > 1:  # what libjpeg's scaling left to reduce
            factor = math.ceil(max(image.size) / WORKING_SIDE)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise InvalidImageError(
            f"{name}: the image data is damaged or truncated ({error}). Upload the file again, or export it anew."
        ) from error
    return _reduced(image, factor) if factor > 1 else image


def _reduced(image: Image.Image, factor: int) -> Image.Image:
    """Box-reduced by `factor` a strip of rows at a time, so that no converted copy (Pillow reduces RGBA
    through a premultiplied copy; palettes and high bit depths need one) is ever full-size."""
    if image.mode in HIGH_DEPTH_MODES:
        mode = "F"
    elif image.mode in ("P", "PA"):
        mode = "RGBA" if image.mode == "PA" or "transparency" in image.info else "RGB"
    else:
        mode = "L" if image.mode == "1" else image.mode
    reduced = Image.new(mode, (math.ceil(image.width / factor), math.ceil(image.height / factor)))
    strip_rows = 256 * factor
    for top in range(0, image.height, strip_rows):
        strip = image.crop((0, top, image.width, min(top + strip_rows, image.height)))
        reduced.paste((strip if strip.mode == mode else strip.convert(mode)).reduce(factor), (0, top // factor))
    reduced.info = dict(image.info)
    return reduced


def _to_gray(image: Image.Image) -> XrayReading:
    """Grey, its chroma and transparency, converted a strip of rows at a time: beside the decoded image
    only the grey result is ever full-size."""
    if image.mode in HIGH_DEPTH_MODES:
        return XrayReading(Image.fromarray(_to_uint8(np.asarray(image)), mode="L"))
    if image.mode in ("L", "1"):
        return XrayReading(image if image.mode == "L" else image.convert("L"))
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    step = max(1, max(image.size) // 256)  # chroma and transparency are sampled on ~256 px a side
    strip_rows = step * math.ceil(512 / step)  # strips start on sampled rows: the samples of the whole image
    gray = Image.new("L", image.size)
    chroma_sum = transparent = samples = 0
    for top in range(0, image.height, strip_rows):
        strip = image.crop((0, top, image.width, min(top + strip_rows, image.height)))
        if has_alpha:
            rgba = strip if strip.mode == "RGBA" else strip.convert("RGBA")
            transparent += int((np.asarray(rgba.getchannel("A"))[::step, ::step] < 255).sum())
            # Transparent areas become black, the colour of the air around a chest on a radiograph.
            strip = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
            strip.alpha_composite(rgba)
        rgb = strip if strip.mode == "RGB" else strip.convert("RGB")
        strip_sum, strip_samples = _chroma_sum(np.asarray(rgb), step)
        chroma_sum, samples = chroma_sum + strip_sum, samples + strip_samples
        gray.paste(rgb.convert("L"), (0, top))
    return XrayReading(gray, chroma_sum / samples, transparency=transparent / samples if has_alpha else 0.0)


def load_xray(source: str | os.PathLike | bytes | Image.Image, draft_size: int | None = None) -> Image.Image:
    """An image file (path or bytes) or a PIL image as 8-bit grey, EXIF rotation applied. `draft_size` lets JPEG
    decoding skip detail that a later resize to that size would discard anyway."""
    return read_xray(source, draft_size).image


def read_xray(source: str | os.PathLike | bytes | Image.Image, draft_size: int | None = None) -> XrayReading:
    """`load_xray` with what the file was before it became grey. With `draft_size`, libjpeg decodes a colour JPEG
    straight to grey, so its chroma reads 0: leave `draft_size` out where the colour matters."""
    if isinstance(source, Image.Image):
        _check_size(*source.size, "image")
        return _to_gray(_decoded(source, "image", draft_size))
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
    if data[128:132] == b"DICM" or name.lower().endswith(DICOM_SUFFIXES):  # the DICOM preamble's magic
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
    _check_size(*stored_size, name)  # before waiting for a decode slot: a refusal waits for nothing
    with _decode_slot(image.width * image.height):
        decoded = _decoded(image, name, draft_size)
        if decoded is not image:
            image.close()  # frees the full-size pixels before the conversions
        reading = _to_gray(decoded)
        del decoded
        gray = ImageOps.exif_transpose(reading.image) if "exif" in image.info else reading.image
    return XrayReading(gray, reading.chroma, stored_size, stored_mode, reading.transparency)
