"""data_prep/prepare.py on real data: full-resolution originals, messy downloads, broken files,
the patient-grouped validation split, and atomic, deterministic output."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.prepare import (
    PREPARED_FORMAT,
    PREPARED_SUFFIX,
    LayoutError,
    PrepareArguments,
    find_dataset_root,
    grouped_validation_split,
    main,
    prepare,
    read_manifest,
)
from pneumonia_vit.images import LABELS, load_xray, patient_id
from pneumonia_vit.preprocess import resize_gray

REPO = Path(__file__).resolve().parent.parent
SIZE = 64


# ---------------------------------------------------------------------------------------------
# helpers


def tree_digest(root: Path) -> dict[str, str]:
    """Every file and folder below root: sha256 for files, "dir" for folders."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        for path in sorted(root.rglob("*"))
    }


def folder_bytes(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def read_index(output: Path) -> list[dict]:
    with (output / "prepared_index.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def copy_kaggle_tree(data_root: Path, target: Path, counts: dict[str, int], splits=("train", "val", "test"),
                     labels=LABELS) -> Path:
    """A Kaggle-layout tree of real 224 px images, the first `counts[split]` of each class."""
    for split in splits:
        for label in labels:
            folder = target / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for path in sorted((data_root / "chest_xray_224" / split / label.upper()).iterdir())[:counts[split]]:
                shutil.copy(path, folder / path.name)
    return target


def run_prepare(source: Path, output: Path, **kwargs) -> dict:
    kwargs.setdefault("size", SIZE)
    kwargs.setdefault("num_workers", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # partial trees warn about files missing from the manifest
        return prepare(PrepareArguments(source=str(source), output=str(output), **kwargs))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "data_prep/prepare.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


# ---------------------------------------------------------------------------------------------
# the real full-resolution originals: all of test/ and val/, 45 train images


@pytest.fixture(scope="module")
def originals_run(data_root, tmp_path_factory):
    source = data_root / "chest_xray_originals"
    before = tree_digest(source)
    output = tmp_path_factory.mktemp("originals") / "prepared"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = prepare(PrepareArguments(source=str(source), output=str(output), size=SIZE, num_workers=2))
    return {"source": source, "output": output, "report": report, "before": before,
            "after": tree_digest(source), "warnings": [str(w.message) for w in caught]}


def test_originals_source_is_untouched(originals_run):
    assert originals_run["before"] == originals_run["after"]
    assert len([v for v in originals_run["before"].values() if v != "dir"]) == 624 + 16 + 45


def test_originals_manifest_check(originals_run):
    report = originals_run["report"]
    check = report["manifest_check"]
    # The report names the folder it read, links resolved (../shared may be a link to the data).
    assert report["source_root"] == str(originals_run["source"].resolve())
    assert check["counts"] == {
        "train/NORMAL": {"found": 20, "official": 1341},
        "train/PNEUMONIA": {"found": 25, "official": 3875},
        "val/NORMAL": {"found": 8, "official": 8},
        "val/PNEUMONIA": {"found": 8, "official": 8},
        "test/NORMAL": {"found": 234, "official": 234},
        "test/PNEUMONIA": {"found": 390, "official": 390},
    }
    # The partial train split shows up as missing files, and only there.
    assert len(check["missing"]) == (1341 - 20) + (3875 - 25)
    assert all(name.startswith("train/") for name in check["missing"])
    assert check["extra"] == [] and check["altered"] == []
    assert report["unreadable"] == []
    assert any("5171 file(s) missing" in message for message in originals_run["warnings"])


def test_originals_outputs_are_grayscale_squares_listed_in_the_index(originals_run):
    output, report = originals_run["output"], originals_run["report"]
    rows = read_index(output)
    on_disk = sorted(str(path.relative_to(output)) for path in output.rglob("*" + PREPARED_SUFFIX))
    assert sorted(row["prepared_file"] for row in rows) == on_disk
    assert sorted(path.name for path in output.iterdir()) == [
        "prepare_report.json", "prepared_index.csv", "test", "train", "validation"]
    for name in on_disk:
        with Image.open(output / name) as image:
            assert image.format == PREPARED_FORMAT and image.mode == "L" and image.size == (SIZE, SIZE), name
    # The app's and the data pipeline's reader accepts the cached format and reads the same pixels.
    for name in on_disk[:: max(1, len(on_disk) // 20)]:
        with Image.open(output / name) as image:
            assert np.array_equal(np.asarray(load_xray(output / name)), np.asarray(image)), name
    for row in rows:
        split, label, _ = row["prepared_file"].split("/")
        assert (split, label) == (row["split"], row["label"])
    assert json.loads((output / "prepare_report.json").read_text()) == report
    # The official test split is kept whole and apart: 234 / 390.
    assert report["prepared"]["test"] == {"NORMAL": 234, "PNEUMONIA": 390}
    assert Counter((row["split"], row["label"]) for row in rows if row["official_split"] == "test") == {
        ("test", "NORMAL"): 234, ("test", "PNEUMONIA"): 390}
    assert all(row["official_split"] == "test" for row in rows if row["split"] == "test")
    for split in ("train", "validation"):
        assert sum(report["prepared"][split].values()) == sum(row["split"] == split for row in rows)
    assert sum(report["prepared"]["train"].values()) + sum(report["prepared"]["validation"].values()) == 45 + 16


def test_originals_index_metadata_matches_the_source_files(originals_run):
    source, rows = originals_run["source"], read_index(originals_run["output"])
    manifest = read_manifest()
    assert len(rows) == 685
    modes = Counter()
    for row in rows:
        path = source / row["source_file"]
        data = path.read_bytes()
        assert row["sha256"] == hashlib.sha256(data).hexdigest() == manifest[
            (row["official_split"], row["label"], path.name)]
        assert row["patient_id"] == patient_id(path.name)
        with Image.open(path) as image:
            assert (int(row["original_width"]), int(row["original_height"])) == image.size
            assert row["original_mode"] == image.mode
        modes[row["original_mode"]] += 1
    # Five of the train PNEUMONIA originals are stored as RGB; all came out grayscale anyway.
    assert modes == {"L": 680, "RGB": 5}
    by_file = {Path(row["source_file"]).name: row for row in rows}
    assert by_file["person1010_virus_1695.jpeg"]["patient_id"] == "person1010"
    assert by_file["NORMAL2-IM-1427-0001.jpeg"]["patient_id"] == "NORMAL2-IM-1427"
    assert by_file["IM-0195-0001.jpeg"]["patient_id"] == "IM-0195"


def test_originals_prepared_pixels_show_the_source_image(originals_run):
    """JPEG draft decoding may shave detail, but the picture is the source's (no rotation, no mix-up)."""
    source, output = originals_run["source"], originals_run["output"]
    rows = [row for row in read_index(output) if row["original_mode"] == "RGB"] + read_index(output)[:3]
    for row in rows:
        prepared = np.asarray(Image.open(output / row["prepared_file"]), dtype=float)
        reference = np.asarray(resize_gray(load_xray(source / row["source_file"]), SIZE), dtype=float)
        assert np.abs(prepared - reference).mean() < 5, row["source_file"]


def test_originals_validation_split_is_patient_grouped(originals_run):
    rows = read_index(originals_run["output"])
    train = [row for row in rows if row["split"] == "train"]
    validation = [row for row in rows if row["split"] == "validation"]
    assert {row["label"] for row in validation} == set(LABELS)
    assert not {row["patient_id"] for row in train} & {row["patient_id"] for row in validation}
    assert not {row["sha256"] for row in train} & {row["sha256"] for row in validation}
    assert {row["official_split"] for row in train + validation} == {"train", "val"}


# ---------------------------------------------------------------------------------------------
# finding the dataset in a messy download


def test_root_discovery_ignores_macosx_dotfiles_and_readme(data_root, tmp_path):
    download = tmp_path / "chest-xray-pneumonia"
    real = copy_kaggle_tree(data_root, download / "chest_xray" / "chest_xray", {"train": 5, "val": 2, "test": 3})
    # macOS zip debris: an AppleDouble copy of the tree, fuller than the real one, with ._ files.
    mac = copy_kaggle_tree(data_root, download / "__MACOSX" / "chest_xray" / "chest_xray",
                           {"train": 9, "val": 2, "test": 6})
    for path in list(mac.rglob("*.jpeg")):
        (path.parent / f"._{path.name}").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 78)
    # Finder and Kaggle leftovers inside and around the real tree.
    for folder in [download, real, real / "train", real / "train" / "NORMAL", real / "test" / "PNEUMONIA"]:
        (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + b"\x00" * 64)
    (real / "train" / "NORMAL" / "._IM-0115-0001.jpeg").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 78)
    (download / "README.txt").write_text("Chest X-Ray Images (Pneumonia), CC BY 4.0\n")
    (real / "train" / "PNEUMONIA" / "notes.txt").write_text("not an image\n")

    assert find_dataset_root(download) == real
    # Kaggle's archive also has a (here: smaller) copy one level up: the fullest tree wins, not the shallowest.
    copy_kaggle_tree(data_root, download / "chest_xray", {"train": 1, "test": 1}, splits=("train", "test"))
    assert find_dataset_root(download) == real
    output = tmp_path / "prepared"
    report = run_prepare(download, output)
    assert report["source_root"] == str(real.resolve())
    assert report["unreadable"] == []
    counts = report["manifest_check"]["counts"]
    assert {key: value["found"] for key, value in counts.items()} == {
        "train/NORMAL": 5, "train/PNEUMONIA": 5, "val/NORMAL": 2, "val/PNEUMONIA": 2,
        "test/NORMAL": 3, "test/PNEUMONIA": 3}
    # 224 px copies are not the originals: every found file is "altered", none is "extra".
    assert report["manifest_check"]["extra"] == []
    assert len(report["manifest_check"]["altered"]) == 20
    rows = read_index(output)
    assert len(rows) == 20
    assert not [row for row in rows if Path(row["source_file"]).name.startswith(".")]
    assert not list(output.rglob(".*")) and not list(output.rglob("*.txt"))


# ---------------------------------------------------------------------------------------------
# broken files and broken layouts


def test_unreadable_files_are_reported_and_skipped(data_root, tmp_path):
    source = copy_kaggle_tree(data_root, tmp_path / "chest_xray", {"train": 6, "val": 2, "test": 3})
    real_jpeg = next((source / "train" / "PNEUMONIA").iterdir()).read_bytes()
    (source / "train" / "PNEUMONIA" / "person9001_bacteria_1.jpeg").write_bytes(real_jpeg[: len(real_jpeg) // 2])
    (source / "train" / "NORMAL" / "IM-9002-0001.jpeg").write_text("this is not a JPEG\n")
    (source / "test" / "NORMAL" / "IM-9003-0001.jpeg").write_bytes(b"")

    output = tmp_path / "prepared"
    report = run_prepare(source, output)
    unreadable = {item["file"]: item["error"] for item in report["unreadable"]}
    assert set(unreadable) == {"train/PNEUMONIA/person9001_bacteria_1.jpeg", "train/NORMAL/IM-9002-0001.jpeg",
                               "test/NORMAL/IM-9003-0001.jpeg"}
    assert "truncated" in unreadable["train/PNEUMONIA/person9001_bacteria_1.jpeg"]
    assert "not a readable image" in unreadable["train/NORMAL/IM-9002-0001.jpeg"]
    assert "empty" in unreadable["test/NORMAL/IM-9003-0001.jpeg"]
    assert all(message.startswith(Path(name).name + ":") for name, message in unreadable.items())
    # Everything else is prepared; the broken files are in the manifest check as extra files.
    rows = read_index(output)
    assert len(rows) == 2 * (6 + 2 + 3)
    assert not {Path(row["source_file"]).name for row in rows} & {Path(name).name for name in unreadable}
    assert sum(sum(counts.values()) for counts in report["prepared"].values()) == 22
    assert len(report["manifest_check"]["extra"]) == 3
    assert report["prepared"]["test"] == {"NORMAL": 3, "PNEUMONIA": 3}


def test_every_accepted_file_type_is_prepared(data_root, tmp_path):
    """data_prep takes what the app accepts (images.IMAGE_SUFFIXES), DICOM and GIF included."""
    from odd_files import READABLE, make_odd_files

    source = copy_kaggle_tree(data_root, tmp_path / "chest_xray", {"train": 6, "val": 2, "test": 3})
    xray = next((source / "train" / "NORMAL").iterdir())
    odd = make_odd_files(tmp_path / "odd", xray)
    for name in READABLE:
        shutil.copy(odd[name].path, source / "train" / "NORMAL" / name)
    report = run_prepare(source, tmp_path / "prepared")
    assert report["unreadable"] == []
    prepared = {Path(row["source_file"]).name for row in read_index(tmp_path / "prepared")}
    assert set(READABLE) <= prepared


@pytest.mark.parametrize("layout", ["no_test_folder", "lowercase_classes"])
def test_wrong_layout_exits_with_a_clear_error(data_root, tmp_path, layout):
    if layout == "no_test_folder":
        source = copy_kaggle_tree(data_root, tmp_path / "chest_xray", {"train": 2, "val": 1}, splits=("train", "val"))
    else:
        # Lower-case class folders are refused rather than guessed: the labels come from folder names.
        source = copy_kaggle_tree(data_root, tmp_path / "chest_xray", {"train": 2, "val": 1, "test": 1},
                                  labels=("normal", "pneumonia"))
    output = tmp_path / "prepared"
    result = run_cli("--source", str(source), "--output", str(output), "--size", str(SIZE), "--num_workers", "1")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and "no dataset found" in message
    for expected in ("train/NORMAL", "train/PNEUMONIA", "test/NORMAL", "test/PNEUMONIA"):
        assert f"<root>/{expected}" in message
    if layout == "lowercase_classes":
        assert "train/normal" in message  # the folders it did see
    assert not output.exists() and not list(tmp_path.glob(".prepared*"))


def test_missing_source_folder_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["--source", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out")])
    assert str(exit_info.value.code).startswith("error: ") and "no such folder" in str(exit_info.value.code)
    with pytest.raises(LayoutError):
        find_dataset_root(tmp_path)  # an empty folder


# ---------------------------------------------------------------------------------------------
# the patient-grouped validation split


def _manifest_pool(with_copies: bool = False) -> list[dict]:
    """The official train + val files as split records (patients from names, sha256 from the manifest)."""
    records = [
        {"label": label, "patient_id": patient_id(name), "sha256": sha, "prepared_file": f"{label}/{Path(name).stem}{PREPARED_SUFFIX}"}
        for (split, label, name), sha in sorted(read_manifest().items()) if split != "test"
    ]
    if with_copies:
        # Byte-identical copies under other patients' names: the sha256 must keep them with their original.
        for number, record in enumerate(records[::97]):
            stem = f"person{90000 + number}_bacteria_{number}" if record["label"] == "PNEUMONIA" else f"IM-{9000 + number}-0001"
            records.append({**record, "patient_id": patient_id(stem + ".jpeg"), "prepared_file": f"{record['label']}/{stem}{PREPARED_SUFFIX}"})
    return records


def test_grouped_split_on_the_full_training_pool():
    records = _manifest_pool(with_copies=True)
    assert len(records) > 5216 + 16
    held_out = grouped_validation_split(records, fraction=0.1, seed=42)
    validation = [records[i] for i in held_out]
    train = [record for i, record in enumerate(records) if i not in held_out]
    for key in ("patient_id", "sha256"):
        assert not {r[key] for r in train} & {r[key] for r in validation}, key
    pool = Counter(r["label"] for r in records)
    taken = Counter(r["label"] for r in validation)
    assert set(taken) == set(LABELS)
    for label in LABELS:
        assert abs(taken[label] / pool[label] - 0.1) < 0.01, (label, taken[label], pool[label])

    assert grouped_validation_split(records, fraction=0.1, seed=42) == held_out
    assert grouped_validation_split(records, fraction=0.1, seed=7) != held_out
    assert grouped_validation_split(list(records), fraction=0.2, seed=42) != held_out


def test_duplicate_copies_stay_on_one_side_end_to_end(data_root, tmp_path):
    source = copy_kaggle_tree(data_root, tmp_path / "chest_xray", {"train": 12, "val": 2, "test": 2})
    # Renamed byte-identical copies (other patient ids) of four training images.
    originals = sorted((source / "train" / "PNEUMONIA").iterdir())[:2] + sorted((source / "train" / "NORMAL").iterdir())[:2]
    for number, path in enumerate(originals):
        name = f"person{8000 + number}_bacteria_1.jpeg" if "PNEUMONIA" in str(path) else f"IM-{8000 + number}-0001.jpeg"
        shutil.copy(path, path.parent / name)
    for seed in (1, 2, 3):
        output = tmp_path / f"prepared_{seed}"
        run_prepare(source, output, validation_fraction=0.3, seed=seed)
        rows = read_index(output)
        sides = {}
        for row in rows:
            sides.setdefault(row["sha256"], set()).add(row["split"])
        assert all(len(splits) == 1 for splits in sides.values())
        assert {row["label"] for row in rows if row["split"] == "validation"} == set(LABELS)


# ---------------------------------------------------------------------------------------------
# atomic and deterministic output


def test_output_is_deterministic_and_atomic(small_kaggle_tree, tmp_path):
    first = tmp_path / "first"
    run_prepare(small_kaggle_tree, first, num_workers=1)
    reference = folder_bytes(first)

    # Same input, other worker count, other folder: byte-identical.
    second = tmp_path / "second"
    run_prepare(small_kaggle_tree, second, num_workers=2)
    assert folder_bytes(second) == reference

    # An existing output is refused without --overwrite, and left as it was.
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_prepare(small_kaggle_tree, first)
    with pytest.raises(SystemExit) as exit_info:
        main(["--source", str(small_kaggle_tree), "--output", str(first), "--size", str(SIZE), "--num_workers", "1"])
    assert "exists; pass --overwrite" in str(exit_info.value.code)
    assert folder_bytes(first) == reference

    # A run interrupted while writing leaves .NAME.partial; the next run clears it and ends the same.
    third = tmp_path / "third"
    stale = tmp_path / ".third.partial"
    (stale / "train" / "NORMAL").mkdir(parents=True)
    (stale / "train" / "NORMAL" / "stale.png").write_bytes(b"half-written")
    (stale / "prepared_index.csv").write_text("prepared_file\n")
    run_prepare(small_kaggle_tree, third)
    assert folder_bytes(third) == reference
    assert not stale.exists()

    # --overwrite replaces the folder: another seed gives another split, and nothing is left behind.
    run_prepare(small_kaggle_tree, first, overwrite=True, seed=7)
    replaced = folder_bytes(first)
    assert replaced != reference
    assert replaced["prepared_index.csv"] != reference["prepared_index.csv"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["first", "second", "third"]
    run_prepare(small_kaggle_tree, first, overwrite=True)
    assert folder_bytes(first) == reference
    assert sorted(path.name for path in tmp_path.iterdir()) == ["first", "second", "third"]
