"""load_xray / read_xray on every bad and odd input the app must survive (files made in the test)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumonia_vit.images import InvalidImageError, load_xray, read_xray
from tests.odd_files import BAD, READABLE, OddFile, dicom_bytes, make_odd_files

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
