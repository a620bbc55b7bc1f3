"""load_xray / read_xray on every bad and odd input the app must survive (files made in the test)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumonia_vit.images import (
    MAX_INFLATED_BYTES,
    MAX_LARGE_DECODES,
    REDUCE_ABOVE,
    WORKING_SIDE,
    InvalidImageError,
    load_xray,
    read_xray,
)
from tests.odd_files import (
    BAD,
    READABLE,
    OddFile,
    deflated_dicom_bomb,
    dicom_bytes,
    make_odd_files,
    rgba_png,
    tiff_page_chain,
)

REPO = Path(__file__).resolve().parent.parent
XRAY = REPO / "examples" / "normal_1.jpeg"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, OddFile]:
    made = make_odd_files(tmp_path_factory.mktemp("odd"), XRAY)
    assert set(made) == set(BAD) | set(READABLE)
    return made


@pytest.fixture(scope="module")
def original() -> np.ndarray:
    return np.asarray(Image.open(XRAY).convert("L"), dtype=np.int16)


@pytest.mark.parametrize("name", BAD)
def test_bad_input_gives_a_clear_message(files, name):
    odd = files[name]
    with pytest.raises(InvalidImageError) as caught:
        load_xray(odd.path)
    message = str(caught.value)
    assert odd.error in message
    assert message.startswith(name), "the message names the file, not a server path"
    assert "decompression bomb" not in message and "exceeds limit of" not in message, "one limit: the app's own"


@pytest.mark.parametrize("name", READABLE)
def test_odd_input_becomes_8bit_gray_of_its_size(files, name):
    odd = files[name]
    image = load_xray(odd.path)
    assert image.mode == "L"
    assert image.size == odd.size


def test_sixteen_bit_png_is_stretched_back_to_the_original(files, original):
    pixels = np.asarray(load_xray(files["gray16.png"].path), dtype=np.int16)
    low, high = original.min(), original.max()
    expected = np.round((original - low) * 255.0 / (high - low))
    assert np.abs(pixels - expected).max() <= 1


def test_rgba_png_keeps_the_gray_values(files, original):
    assert np.array_equal(np.asarray(load_xray(files["rgba.png"].path), dtype=np.int16), original)


def test_transparent_pixels_become_black():
    rgba = Image.new("RGBA", (100, 100), (255, 255, 255, 0))
    rgba.paste((200, 200, 200, 255), (0, 0, 50, 100))
    pixels = np.asarray(load_xray(rgba))
    assert pixels[:, :50].min() == 200 and pixels[:, 50:].max() == 0


def test_cmyk_jpeg_is_close_to_the_original(files, original):
    pixels = np.asarray(load_xray(files["cmyk.jpg"].path), dtype=np.int16)
    assert np.abs(pixels - original).mean() < 3


def test_animated_gif_uses_its_first_frame(files, original):
    pixels = np.asarray(load_xray(files["animated.gif"].path), dtype=np.int16)
    assert np.abs(pixels - original).mean() < np.abs(pixels - (255 - original)).mean() / 4


def test_dicom_16bit_and_monochrome1_read_as_the_original(files, original):
    low, high = original.min(), original.max()
    expected = np.round((original - low) * 255.0 / (high - low))
    for name in ("valid16.dcm", "monochrome1.dcm"):
        pixels = np.asarray(load_xray(files[name].path), dtype=np.int16)
        assert np.abs(pixels - expected).max() <= 1, name


def test_dicom_is_recognised_by_content_and_by_suffix(files, original, tmp_path):
    data = dicom_bytes(original.astype(np.uint16))
    (tmp_path / "no_suffix").write_bytes(data)
    assert load_xray(tmp_path / "no_suffix").size == files["valid16.dcm"].size
    assert load_xray(data).size == files["valid16.dcm"].size
    (tmp_path / "garbage.dcm").write_bytes(b"not a dicom at all" * 10)
    with pytest.raises(InvalidImageError, match="DICOM"):
        load_xray(tmp_path / "garbage.dcm")


def test_dicom_without_size_and_multiframe(files, original, tmp_path):
    import pydicom

    data = dicom_bytes(np.stack([original, 255 - original]).astype(np.uint16), frames=2)
    first = np.asarray(load_xray(data), dtype=np.int16)
    assert np.abs(first - original).mean() < 2, "the first frame is used"
    dataset = pydicom.dcmread(__import__("io").BytesIO(data))
    del dataset.Rows
    dataset.save_as(tmp_path / "no_rows.dcm")
    with pytest.raises(InvalidImageError, match="Rows/Columns"):
        load_xray(tmp_path / "no_rows.dcm")


def test_tiny_and_oversized_limits(tmp_path):
    Image.new("L", (63, 500)).save(tmp_path / "thin.png")
    with pytest.raises(InvalidImageError, match="at least 64 pixels"):
        load_xray(tmp_path / "thin.png")
    Image.new("L", (64, 64)).save(tmp_path / "smallest.png")
    assert load_xray(tmp_path / "smallest.png").size == (64, 64)


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("L", (200, 100), 0)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    assert load_xray(tmp_path / "rotated.jpg").size == (100, 200)


def test_other_formats_are_refused_before_decoding(tmp_path):
    # Pillow would hand an EPS file to Ghostscript; an upload endpoint must not.
    (tmp_path / "drawing.jpg").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\nshowpage\n")
    with pytest.raises(InvalidImageError, match="not a readable image"):
        load_xray(tmp_path / "drawing.jpg")


def test_folders_and_missing_files(tmp_path):
    with pytest.raises(InvalidImageError, match="folder"):
        load_xray(tmp_path)
    with pytest.raises(InvalidImageError, match="no such file"):
        load_xray(tmp_path / "missing.png")


def test_chroma_of_grey_rgb_is_zero_and_of_colour_is_high(tmp_path, data_root):
    # Kermany stores some PNEUMONIA originals as RGB JPEGs with grey content: they must read as grey.
    rgb_originals = [
        path for path in sorted((data_root / "chest_xray_originals" / "train" / "PNEUMONIA").iterdir())
        if Image.open(path).mode == "RGB"
    ]
    assert rgb_originals, "the sample of train originals holds RGB JPEGs"
    for path in rgb_originals:
        assert read_xray(path).chroma < 1.0, path.name
    colour = np.zeros((128, 128, 3), np.uint8)
    colour[..., 0] = 200
    colour[..., 1] = np.arange(128)[:, None]
    Image.fromarray(colour).save(tmp_path / "colour.jpg")
    reading = read_xray(tmp_path / "colour.jpg")
    assert reading.chroma > 50 and reading.image.mode == "L"
    assert read_xray(XRAY).chroma == 0.0


# Budgets (issue #31). Peak memory is read in a fresh process: after a warm-up read, writing 5 to
# /proc/self/clear_refs restarts VmHWM (the peak resident size) from the resident size of that moment,
# so VmHWM afterwards minus VmRSS before is what the one file cost at its peak, not sampled.
PEAK_SCRIPT = """
import json, sys
from pneumonia_vit.images import InvalidImageError, read_xray

def kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))

for warm in sys.argv[2:]:
    read_xray(warm)
open("/proc/self/clear_refs", "w").write("5")
before = kib("VmRSS:")
try:
    reading = read_xray(sys.argv[1])
    outcome = {"size": reading.image.size, "transparency": reading.transparency}
except InvalidImageError as error:
    outcome = {"error": str(error)}
print(json.dumps({**outcome, "peak_mib": (kib("VmHWM:") - before) / 1024}))
"""


def read_in_fresh_process(path: Path, files: dict[str, OddFile]) -> dict:
    warm = [str(XRAY), str(files["valid16.dcm"].path)]
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path), *warm], cwd=REPO, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def test_deflated_dicom_bomb_is_refused_on_its_header_before_its_pixels_are_inflated(files, tmp_path):
    bomb = tmp_path / "bomb.dcm"
    bomb.write_bytes(deflated_dicom_bomb())  # 1 MB that inflates to 1 GiB
    assert len(bomb.read_bytes()) < 1.1e6
    result = read_in_fresh_process(bomb, files)
    assert "537 megapixels); the limit is 50 megapixels. Downscale" in result["error"]
    assert result["peak_mib"] < 20, result
    frames = deflated_dicom_bomb(4000, 4000, frames=10)  # 320 MB stated: refused on the header too
    with pytest.raises(InvalidImageError, match="inflates to more than 101 MB, the limit. Export the first frame"):
        load_xray(frames)


def test_deflated_dicom_that_understates_its_pixel_data_is_inflated_only_up_to_the_limit(files, tmp_path):
    bomb = tmp_path / "understated.dcm"
    bomb.write_bytes(deflated_dicom_bomb(1000, 1000, pixel_bytes=1 << 30))
    result = read_in_fresh_process(bomb, files)
    assert "inflates to more than 101 MB" in result["error"]
    # zlib joins its output blocks into one bytes object at the end: the inflated limit, twice at worst.
    assert result["peak_mib"] < 2 * MAX_INFLATED_BYTES / 2**20 + 30, result


def test_deflated_dicom_within_the_limit_reads_as_the_plain_one(original):
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    pixels = original.astype(np.uint16) * 16
    deflated = dicom_bytes(pixels, transfer_syntax=DeflatedExplicitVRLittleEndian)
    assert np.array_equal(np.asarray(load_xray(deflated)), np.asarray(load_xray(dicom_bytes(pixels))))


def test_dicom_codec_without_a_decoder_is_refused_before_decoding(original):
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLSLossless

    dataset = pydicom.dcmread(io.BytesIO(dicom_bytes(original.astype(np.uint16))))
    dataset.file_meta.TransferSyntaxUID = JPEGLSLossless
    dataset.PixelData = encapsulate([b"\xff\xd8 not decoded \xff\xd9"])
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    with pytest.raises(InvalidImageError, match="compressed as JPEG-LS Lossless.*cannot decode. Export it uncompressed"):
        load_xray(buffer.getvalue())


def test_dicom_frame_beyond_the_decoded_byte_budget_is_refused():
    import pydicom

    dataset = pydicom.dcmread(io.BytesIO(dicom_bytes(np.zeros((64, 64), np.uint16))))
    dataset.Rows, dataset.Columns, dataset.SamplesPerPixel = 5000, 5000, 3  # 150 MB a frame, stated not stored
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    with pytest.raises(InvalidImageError, match="takes 150 MB decoded .* the limit is 100 MB"):
        load_xray(buffer.getvalue())


def test_tiff_chaining_50000_pages_is_read_at_its_first_page_fast(tmp_path):
    chain = tmp_path / "chain.tif"
    chain.write_bytes(tiff_page_chain(50_000))
    start = time.perf_counter()
    gray = load_xray(chain)
    assert time.perf_counter() - start < 1.0, "the page chain is not walked"
    assert gray.size == (256, 256) and np.asarray(gray)[-1, -1] == 255


def test_7000_px_rgba_png_is_reduced_before_conversion_within_a_memory_bound(files, tmp_path):
    png = tmp_path / "rgba.png"
    png.write_bytes(rgba_png(7000))
    result = read_in_fresh_process(png, files)
    # Decoded at 4 bytes a pixel the file takes 187 MiB; each full-size converted copy would add as much.
    assert result["peak_mib"] < 187 + 150, result
    assert tuple(result["size"]) == (1750, 1750) and result["transparency"] == pytest.approx(0.25, abs=0.01)
    gray = np.asarray(load_xray(png))
    assert gray[:, :1312].min() == 200 and gray[:, 1313:].max() == 0, "opaque grey stays, transparent is black"


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "P"])
def test_large_images_are_reduced_as_a_whole_image_reduce_would(mode):
    width = REDUCE_ABOVE + 300  # reduced by 3 to at most WORKING_SIDE
    ramp = np.add.outer(np.arange(700) * 3, np.arange(width) // 20) % 256
    image = Image.fromarray(ramp.astype(np.uint8))
    if mode == "RGBA":
        image = Image.merge("RGBA", [image, image, image, Image.fromarray((255 - ramp).astype(np.uint8))])
    elif mode == "I;16":
        image = Image.fromarray(ramp.astype(np.uint16) * 200)
    elif mode == "P":
        image = image.convert("P")
    whole = image.convert("F" if mode == "I;16" else "RGB" if mode == "P" else mode).reduce(3)
    if mode == "RGBA":
        black = Image.new("RGBA", whole.size, (0, 0, 0, 255))
        whole = Image.alpha_composite(black, whole).convert("RGB")
    expected = load_xray(whole)  # the reference image is small: read as it is
    assert expected.size == (-(-width // 3), -(-700 // 3)) and max(expected.size) <= WORKING_SIDE
    assert np.array_equal(np.asarray(load_xray(image)), np.asarray(expected))


def test_large_jpeg_is_decoded_at_a_reduced_scale_in_its_colours(tmp_path):
    colour = np.zeros((300, REDUCE_ABOVE + 904, 3), np.uint8)
    colour[..., 0] = 200
    Image.fromarray(colour).save(tmp_path / "wide.jpg")
    reading = read_xray(tmp_path / "wide.jpg")
    # libjpeg decodes at half scale (its scales are powers of 2), the box reduction does the rest
    assert reading.image.size == (1250, 75) and reading.stored_size == (5000, 300)
    assert reading.chroma > 150, "decoded in colour, not straight to grey"


def test_large_dicom_is_box_reduced(original):
    pixels = np.tile(original.astype(np.uint16), (1, 9))[:, : REDUCE_ABOVE + 100] * 16
    gray = np.asarray(load_xray(dicom_bytes(pixels)), dtype=np.float32)
    factor = 3
    blocks = pixels[: pixels.shape[0] // factor * factor, : pixels.shape[1] // factor * factor].astype(np.float32)
    means = blocks.reshape(blocks.shape[0] // factor, factor, blocks.shape[1] // factor, factor).mean(axis=(1, 3))
    expected = (means - means.min()) * 255 / (means.max() - means.min())
    assert gray.shape == expected.shape and np.abs(gray - expected).max() <= 1


def test_transparency_is_the_fraction_of_pixels_not_fully_opaque(tmp_path):
    rgba = Image.new("RGBA", (400, 200), (90, 90, 90, 255))
    rgba.paste((90, 90, 90, 0), (0, 0, 100, 200))  # a quarter transparent
    rgba.paste((90, 90, 90, 128), (100, 0, 200, 100))  # an eighth half transparent
    rgba.save(tmp_path / "rgba.png")
    assert read_xray(tmp_path / "rgba.png").transparency == pytest.approx(0.375, abs=0.01)
    grey_alpha = rgba.convert("LA")
    assert read_xray(grey_alpha).transparency == pytest.approx(0.375, abs=0.01)
    palette = Image.new("P", (200, 200), 1)
    palette.paste(0, (0, 0, 200, 50))
    palette.save(tmp_path / "palette.png", transparency=0)
    assert read_xray(tmp_path / "palette.png").transparency == pytest.approx(0.25, abs=0.01)
    assert read_xray(XRAY).transparency == 0.0


def test_large_decodes_wait_for_a_slot_and_small_ones_do_not(tmp_path):
    from pneumonia_vit import images

    Image.new("L", (4000, 4000), 128).save(tmp_path / "large.png")  # 16 MP: above LARGE_PIXELS
    finished = threading.Event()
    for _ in range(MAX_LARGE_DECODES):
        images._LARGE_DECODE_SLOTS.acquire()
    try:
        reader = threading.Thread(target=lambda: (load_xray(tmp_path / "large.png"), finished.set()))
        reader.start()
        assert load_xray(XRAY).size == Image.open(XRAY).size, "a small decode does not wait"
        assert not finished.wait(0.5), "the large decode waits"
    finally:
        for _ in range(MAX_LARGE_DECODES):
            images._LARGE_DECODE_SLOTS.release()
    assert finished.wait(10), "and goes on once a slot is free"
