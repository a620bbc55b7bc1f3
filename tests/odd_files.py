"""Bad and odd input files, generated on the fly from a real X-ray (tests/test_images.py, test_app_api.py).

Each entry says what `load_xray` must do with the file: raise InvalidImageError with a message
containing `error`, or return a grey image of `size`.
"""

from __future__ import annotations

import functools
import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class OddFile:
    path: Path
    error: str | None = None  # expected InvalidImageError text; None: the file must be readable
    size: tuple[int, int] | None = None  # expected (width, height) of the grey image


def _dicom_dataset(image: tuple[int, int, int] | None, photometric: str = "MONOCHROME2", frames: int | None = None):
    """A minimal Part-10 data set describing a grey image of (rows, columns, bits), or none; no Pixel Data yet."""
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
    if image is None:
        return dataset
    dataset.Rows, dataset.Columns, bits = image
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = photometric
    dataset.BitsAllocated = dataset.BitsStored = bits
    dataset.HighBit = bits - 1
    dataset.PixelRepresentation = 0
    if frames:
        dataset.NumberOfFrames = frames
    return dataset


def _saved(dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def dicom_bytes(pixels: np.ndarray | None, photometric: str = "MONOCHROME2", frames: int | None = None,
                transfer_syntax: str | None = None) -> bytes:
    """A minimal valid Part-10 DICOM file holding `pixels` (or no image), explicit VR little endian unless
    `transfer_syntax` says otherwise (pydicom deflates the data set for the deflated one)."""
    if pixels is None:
        return _saved(_dicom_dataset(None))
    dataset = _dicom_dataset((*pixels.shape[-2:], pixels.dtype.itemsize * 8), photometric, frames)
    dataset.PixelData = pixels.tobytes()
    if transfer_syntax:
        dataset.file_meta.TransferSyntaxUID = transfer_syntax
    return _saved(dataset)


@functools.cache
def deflated_dicom_bomb(rows: int = 16384, columns: int = 32768, frames: int | None = None,
                        pixel_bytes: int | None = None) -> bytes:
    """A Deflated Explicit VR Little Endian DICOM of about 1 MB whose 16-bit pixel data (zeros) inflates to
    rows x columns x 2 bytes (1 GiB by default), or to `pixel_bytes` (a header that understates it), made
    without ever holding the inflated bytes."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    dataset = _dicom_dataset((rows, columns, 16), frames=frames)
    dataset.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    without_pixels = _saved(dataset)
    meta_end = 144 + struct.unpack("<I", without_pixels[140:144])[0]  # after (0002,0000)'s group length
    header = zlib.decompress(without_pixels[meta_end:], -zlib.MAX_WBITS)
    pixel_bytes = pixel_bytes or rows * columns * 2 * (frames or 1)
    header += b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", pixel_bytes)  # (7FE0,0010) Pixel Data, OW
    # After a full flush the compressor forgets what came before: every 16 MiB of zeros deflates to the
    # same bytes, so the stream is built from one compressed chunk.
    chunk = 16 << 20
    deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = deflater.compress(header) + deflater.flush(zlib.Z_FULL_FLUSH)
    zeros = deflater.compress(bytes(chunk)) + deflater.flush(zlib.Z_FULL_FLUSH)
    tail = deflater.compress(bytes(pixel_bytes % chunk)) + deflater.flush(zlib.Z_FINISH)
    return without_pixels[:meta_end] + stream + zeros * (pixel_bytes // chunk) + tail


def tiff_page_chain(pages: int = 50_000, first_side: int = 256) -> bytes:
    """A little-endian TIFF: a first_side² grey gradient page, then pages - 1 pages of one pixel each,
    every page an uncompressed strip and a 9-entry IFD (about 115 bytes a page)."""
    out = bytearray(b"II*\x00\x00\x00\x00\x00")
    previous_link = 4  # where the offset of the next IFD goes
    for page in range(pages):
        side = first_side if page == 0 else 1
        pixels = np.linspace(0, 255, side * side).astype(np.uint8).tobytes()
        strip = len(out)
        out += pixels + b"\x00" * (len(pixels) % 2)  # IFDs start on a word boundary
        struct.pack_into("<I", out, previous_link, len(out))
        entries = ((256, 4, side), (257, 4, side), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, strip),
                   (277, 3, 1), (278, 4, side), (279, 4, len(pixels)))
        out += struct.pack("<H", len(entries))
        for tag, kind, value in entries:
            out += struct.pack("<HHII", tag, kind, 1, value) if kind == 4 else struct.pack("<HHIHH", tag, kind, 1, value, 0)
        previous_link = len(out)
        out += b"\x00\x00\x00\x00"
    return bytes(out)


def rgba_png(side: int = 7000, grey: int = 200) -> bytes:
    """A side x side RGBA PNG of a few hundred KB: the left three quarters opaque grey, the right quarter
    fully transparent (transparency 0.25)."""
    opaque = side * 3 // 4
    row = b"\x00" + bytes([grey, grey, grey, 255]) * opaque + bytes(4 * (side - opaque))  # filter byte 0: none
    rows_per_chunk = 64  # the stream repeats one full-flushed chunk, as in deflated_dicom_bomb
    deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = deflater.compress(row * rows_per_chunk) + deflater.flush(zlib.Z_FULL_FLUSH)
    tail = deflater.compress(row * (side % rows_per_chunk)) + deflater.flush()
    checksum = 1
    for count in [rows_per_chunk] * (side // rows_per_chunk) + [side % rows_per_chunk]:
        checksum = zlib.adler32(row * count, checksum)
    body = b"\x78\x9c" + block * (side // rows_per_chunk) + tail + struct.pack(">I", checksum)
    header = struct.pack(">IIBBBBB", side, side, 8, 6, 0, 0, 0)  # 8-bit RGBA
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height 8-bit grey pixels, with one tiny zlib data chunk."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _png_chunk(b"IEND", b""))


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
