"""Bad and odd input files, generated on the fly from a real X-ray (tests/test_images.py, test_app_api.py).

Each entry says what `load_xray` must do with the file: raise InvalidImageError with a message
containing `error`, or return a grey image of `size`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class OddFile:
    path: Path
    error: str | None = None  # expected InvalidImageError text; None: the file must be readable
    size: tuple[int, int] | None = None  # expected (width, height) of the grey image


def dicom_bytes(pixels: np.ndarray | None, photometric: str = "MONOCHROME2", frames: int | None = None) -> bytes:
    """A minimal valid Part-10 DICOM file (explicit VR little endian) holding `pixels` (or no image)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = "CR"
    dataset.PatientName = "Anonymous"
    if pixels is not None:
        dataset.Rows, dataset.Columns = pixels.shape[-2:]
        dataset.SamplesPerPixel = 1
        dataset.PhotometricInterpretation = photometric
        dataset.BitsAllocated = pixels.dtype.itemsize * 8
        dataset.BitsStored = dataset.BitsAllocated
        dataset.HighBit = dataset.BitsStored - 1
        dataset.PixelRepresentation = 0
        if frames:
            dataset.NumberOfFrames = frames
        dataset.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height 8-bit grey pixels, with one tiny zlib data chunk."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def make_odd_files(folder: Path, xray: Path) -> dict[str, OddFile]:
    """Writes every bad and odd input into `folder`; `xray` is a real grey JPEG they are made from."""
    folder.mkdir(parents=True, exist_ok=True)
    gray = Image.open(xray).convert("L")
    pixels = np.asarray(gray)
    size = gray.size
    files: dict[str, OddFile] = {}

    def add(name: str, data: bytes | None = None, image: Image.Image | None = None, error: str | None = None,
            expect_size: tuple[int, int] | None = None, **save_options) -> None:
        path = folder / name
        if image is not None:
            image.save(path, **save_options)
        else:
            path.write_bytes(data or b"")
        files[name] = OddFile(path, error, expect_size if error is None else None)

    # Unreadable: each must give a clear message.
    add("text_named.jpg", b"This is a text file with an image extension.\n" * 20, error="not a readable image")
    add("notes.txt", b"Patient notes, not an image.\n" * 20, error="not a readable image")
    add("report.pdf", b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n" * 20 + b"%%EOF\n", error="not a readable image")
    jpeg = io.BytesIO()
    gray.save(jpeg, "JPEG", quality=90)
    add("truncated.jpg", jpeg.getvalue()[: len(jpeg.getvalue()) // 2], error="damaged or truncated")
    add("empty.png", b"", error="the file is empty")
    # 20000 x 20000 PNG: a few bytes on disk, 400 MP decoded (a decompression bomb).
    add("bomb_20000.png", png_header_only(20000, 20000), error="the limit of 50 megapixels")
    add("tiny_8x8.png", image=Image.new("L", (8, 8), 128), error="only 8×8 pixels")
    add("no_pixels.dcm", dicom_bytes(None), error="no Pixel Data")
    # Odd but valid: each must come out as an 8-bit grey image of the original size.
    add("gray16.png", image=Image.fromarray(pixels.astype(np.uint16) * 257), expect_size=size)
    rgba = gray.convert("RGBA")
    rgba.putalpha(255)
    add("rgba.png", image=rgba, expect_size=size)
    add("cmyk.jpg", image=gray.convert("CMYK"), expect_size=size, quality=95)
    frames = [gray.convert("P"), Image.fromarray(255 - pixels).convert("P")]
    path = folder / "animated.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=200, loop=0)
    files["animated.gif"] = OddFile(path, None, size)
    add("valid16.dcm", dicom_bytes(pixels.astype(np.uint16) * 16 + 1000), expect_size=size)
    add("monochrome1.dcm", dicom_bytes((255 - pixels).astype(np.uint16) * 16, "MONOCHROME1"), expect_size=size)
    return files


BAD = ("text_named.jpg", "notes.txt", "report.pdf", "truncated.jpg", "empty.png", "bomb_20000.png", "tiny_8x8.png", "no_pixels.dcm")
READABLE = ("gray16.png", "rgba.png", "cmyk.jpg", "animated.gif", "valid16.dcm", "monochrome1.dcm")


def bad_files(files: dict[str, OddFile]) -> dict[str, OddFile]:
    return {name: odd for name, odd in files.items() if odd.error}


def readable_files(files: dict[str, OddFile]) -> dict[str, OddFile]:
    return {name: odd for name, odd in files.items() if not odd.error}
