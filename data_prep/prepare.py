"""Prepare the Kermany chest X-ray dataset (Kaggle "chest-xray-pneumonia") for training.

    # after unzipping Kaggle's archive.zip into ~/Downloads/chest-xray-pneumonia
    python data_prep/prepare.py --source ~/Downloads/chest-xray-pneumonia --output data/chest_xray_prepared

    # on this project's machines, from the resized copy of the whole dataset
    python data_prep/prepare.py --source ../shared/data/chest_xray_224 --output data/chest_xray_prepared

It finds the dataset root below --source, checks every file against the official manifest (kermany_manifest.tsv;
a partial dataset is prepared with a warning), reads every image as 8-bit grey (only PNEUMONIA originals are stored
as RGB: a colour mode would be a class cue) resized to --size, carves a validation split out of train + the official
val split by patient and by identical file, and writes train/ validation/ test/ class folders of PGM images (lossless,
nothing to inflate at every epoch), prepared_index.csv and prepare_report.json. The output appears only when complete;
the source folder is only read.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import shutil
import sys
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.pool import ThreadPool
from pathlib import Path

from tqdm import tqdm
from transformers import HfArgumentParser

from pneumonia_vit.cpus import usable_cores
from pneumonia_vit.images import IMAGE_SUFFIXES, LABELS, InvalidImageError, patient_id, read_xray
from pneumonia_vit.preprocess import resize_gray

MANIFEST = Path(__file__).resolve().parent / "kermany_manifest.tsv"
OFFICIAL_SPLITS = ("train", "val", "test")
IGNORED_DIRS = ("__MACOSX",)
# The cached images' format (Pillow's name, file suffix): any lossless format `datasets` reads would do.
PREPARED_FORMAT, PREPARED_SUFFIX = "PPM", ".pgm"


@dataclass
class PrepareArguments:
    source: str = field(metadata={"help": "Folder holding the Kaggle download (chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}), at any depth."})
    output: str = field(metadata={"help": "Folder to create with train/, validation/ and test/ class folders of PGM images."})
    size: int = field(default=224, metadata={"help": "Side in pixels of the cached square images (at least the model's input size)."})
    validation_fraction: float = field(default=0.1, metadata={"help": "Share of each class of the training pool held out for validation, by whole patients."})
    seed: int = field(default=42, metadata={"help": "Seed of the patient-grouped validation split."})
    overwrite: bool = field(default=False, metadata={"help": "Replace --output if it exists (the old folder stays until the new one is complete)."})
    num_workers: int = field(default=usable_cores(), metadata={"help": "Threads that decode and resize images (default: the usable cores)."})


class LayoutError(ValueError):
    """The source folder does not hold the dataset's train/ and test/ class folders."""


def find_dataset_root(source: Path) -> Path:
    """The folder whose train/ and test/ sub-folders hold NORMAL/ and PNEUMONIA/; the fullest one wins."""
    if not source.is_dir():
        raise LayoutError(f"{source}: no such folder")
    candidates = []
    for folder, subfolders, _ in os.walk(source):
        subfolders[:] = sorted(name for name in subfolders if name not in IGNORED_DIRS and not name.startswith("."))
        folder = Path(folder)
        if all((folder / split / label).is_dir() for split in ("train", "test") for label in LABELS):
            count = sum(1 for _ in _image_files(folder))
            candidates.append((-count, len(folder.parts), str(folder)))
    if not candidates:
        found = sorted(str(path.relative_to(source)) for path in source.rglob("*") if path.is_dir())[:10]
        raise LayoutError(
            f"{source}: no dataset found. Expected <root>/train/NORMAL, <root>/train/PNEUMONIA, "
            f"<root>/test/NORMAL and <root>/test/PNEUMONIA (and optionally val/); folders seen: {found or 'none'}"
        )
    return Path(sorted(candidates)[0][2])


def _image_files(root: Path):
    """(official split, label, path) of every image file below root, in a fixed order."""
    for split in OFFICIAL_SPLITS:
        for label in LABELS:
            folder = root / split / label
            if folder.is_dir():
                for path in sorted(folder.iterdir()):
                    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
                        yield split, label, path


def read_manifest(path: Path = MANIFEST) -> dict[tuple[str, str, str], str]:
    with path.open(newline="") as handle:
        return {(row["split"], row["label"], row["file"]): row["sha256"] for row in csv.DictReader(handle, delimiter="\t")}


def _convert(job: tuple[str, int]) -> dict:
    """Worker: hash, decode, resize and encode one source file; returns its record or its error."""
    path, size = job
    data = Path(path).read_bytes()
    record = {"sha256": hashlib.sha256(data).hexdigest()}
    try:
        reading = read_xray(data, draft_size=size)
    except InvalidImageError as error:
        record["error"] = str(error).replace("upload:", Path(path).name + ":", 1)
        return record
    (width, height), mode = reading.stored_size, reading.stored_mode
    record.update(original_width=width, original_height=height, original_mode=mode)
    buffer = io.BytesIO()
    resize_gray(reading.image, size).save(buffer, format=PREPARED_FORMAT)
    record["encoded"] = buffer.getvalue()
    return record


def convert_all(paths: list[Path], size: int, workers: int) -> Iterator[dict]:
    """`_convert` of every path, in order, on `workers` threads: decoding, resizing and hashing run outside the
    GIL, and no image is pickled from one process to another."""
    with ThreadPool(max(1, workers)) as pool:
        yield from pool.imap(_convert, [(str(path), size) for path in paths], chunksize=8)


def grouped_validation_split(records: list[dict], fraction: float, seed: int) -> set[int]:
    """Indices of the training pool that go to validation: whole patients, whole duplicate groups."""
    parent = list(range(len(records)))

    def root(index):
        while parent[index] != index:
            parent[index] = parent[parent[index]]
            index = parent[index]
        return index

    first_seen: dict[str, int] = {}
    for index, record in enumerate(records):
        for key in ("patient:" + record["patient_id"], "sha256:" + record["sha256"]):
            if key in first_seen:
                parent[root(index)] = root(first_seen[key])
            else:
                first_seen[key] = index
    groups: dict[int, list[int]] = defaultdict(list)
    for index in range(len(records)):
        groups[root(index)].append(index)

    rng = random.Random(seed)
    validation: set[int] = set()
    for label in LABELS:
        label_groups = sorted(
            (members for members in groups.values() if Counter(records[i]["label"] for i in members).most_common(1)[0][0] == label),
            key=lambda members: min(records[i]["prepared_file"] for i in members),
        )
        rng.shuffle(label_groups)
        target = round(fraction * sum(len(members) for members in label_groups))
        taken = 0
        for members in label_groups:
            if taken >= target:
                break
            validation.update(members)
            taken += len(members)
    return validation


def check_against_manifest(found: list[tuple[str, str, Path, str]], manifest: dict) -> dict:
    """Counts per split and class, and the missing, extra and altered files."""
    seen = {(split, label, path.name): sha for split, label, path, sha in found}
    differing = {
        "missing": set(manifest) - set(seen),
        "extra": set(seen) - set(manifest),
        "altered": {key for key in set(seen) & set(manifest) if seen[key] != manifest[key]},
    }
    counts = Counter((split, label) for split, label, _ in seen)
    expected = Counter((split, label) for split, label, _ in manifest)
    return {
        "counts": {f"{split}/{label}": {"found": counts[(split, label)], "official": expected[(split, label)]}
                   for split in OFFICIAL_SPLITS for label in LABELS},
        **{kind: ["/".join(key) for key in sorted(keys)] for kind, keys in differing.items()},
    }


def prepare(args: PrepareArguments) -> dict:
    output = Path(args.output).resolve()
    if output.exists() and not args.overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it")
    root = find_dataset_root(Path(args.source).resolve())
    print(f"dataset root: {root}")
    files = list(_image_files(root))

    converted = convert_all([path for _, _, path in files], args.size, args.num_workers)
    results = list(tqdm(converted, total=len(files), desc="decode + resize", unit="img"))

    check = check_against_manifest([(split, label, path, result["sha256"]) for (split, label, path), result in zip(files, results)], read_manifest())
    for kind in ("missing", "extra", "altered"):
        if check[kind]:
            hint = " (a resized or re-encoded copy? its images are used as they are)" if kind == "altered" else ""
            warnings.warn(f"{len(check[kind])} file(s) {kind} compared with the official manifest, e.g. {check[kind][0]}{hint}")
    unreadable = [{"file": str(path.relative_to(root)), "error": result["error"]}
                  for (_, _, path), result in zip(files, results) if "error" in result]
    for item in unreadable:
        warnings.warn(f"skipped unreadable file {item['file']}: {item['error']}")

    records = [{"official_split": split, "label": label, "source_file": str(path.relative_to(root)),
                "prepared_file": f"{label}/{path.stem}{PREPARED_SUFFIX}", "patient_id": patient_id(path.name), **result}
               for (split, label, path), result in zip(files, results) if "error" not in result]
    pool = [record for record in records if record["official_split"] != "test"]
    held_out = grouped_validation_split(pool, args.validation_fraction, args.seed)
    for position, record in enumerate(pool):
        record["split"] = "validation" if position in held_out else "train"
    for record in records:
        record.setdefault("split", "test")
        record["prepared_file"] = f"{record['split']}/{record['prepared_file']}"
    if not any(record["split"] == "validation" for record in records):
        raise ValueError("the validation split came out empty: the training pool is too small")

    partial = output.with_name(f".{output.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    for record in records:
        target = partial / record["prepared_file"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(record.pop("encoded"))
    columns = ["prepared_file", "split", "label", "official_split", "source_file", "sha256", "patient_id",
               "original_width", "original_height", "original_mode"]
    with (partial / "prepared_index.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows({column: record[column] for column in columns} for record in records)
    report = {
        "source_root": str(root), "size": args.size, "seed": args.seed,
        "validation_fraction": args.validation_fraction,
        "prepared": {split: dict(Counter(r["label"] for r in records if r["split"] == split)) for split in ("train", "validation", "test")},
        "unreadable": unreadable, "manifest_check": check,
    }
    (partial / "prepare_report.json").write_text(json.dumps(report, indent=2) + "\n")
    retired = output.with_name(f".{output.name}.old")
    shutil.rmtree(retired, ignore_errors=True)
    if output.exists():
        output.rename(retired)
    partial.rename(output)
    shutil.rmtree(retired, ignore_errors=True)
    print(f"wrote {output}: " + ", ".join(f"{split} {counts}" for split, counts in report["prepared"].items()))
    return report


def main(argv=None) -> None:
    (args,) = HfArgumentParser(PrepareArguments).parse_args_into_dataclasses(args=argv)
    try:
        prepare(args)
    except (LayoutError, FileExistsError, ValueError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
