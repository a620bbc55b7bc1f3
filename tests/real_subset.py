"""Small real datasets for the multi-process, fault and GPU-script tests: the first N images of
each split and class of the data_root fixture's chest_xray_224, run through data_prep."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path


def prepared_subset(data_root: Path, folder: Path, counts: dict[str, tuple[int, int]], size: int = 64,
                    validation_fraction: float = 0.25) -> Path:
    """counts: official split -> (NORMAL, PNEUMONIA) images to take. Returns the prepared folder."""
    from data_prep.prepare import PrepareArguments, prepare
    from pneumonia_vit.images import LABELS

    source = folder / "kaggle"
    for split, numbers in counts.items():
        for label, number in zip(LABELS, numbers):
            target = source / split / label
            target.mkdir(parents=True)
            for path in sorted((data_root / "chest_xray_224" / split / label).iterdir())[:number]:
                shutil.copy(path, target / path.name)
    output = folder / "prepared"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "N files missing compared with the official manifest": a subset on purpose
        prepare(PrepareArguments(source=str(source), output=str(output), size=size,
                                 validation_fraction=validation_fraction, num_workers=1))
    return output


def split_sizes(prepared: Path) -> dict[str, dict[str, int]]:
    """Images per split and class, as data_prep's index lists them."""
    import csv
    from collections import Counter

    with (prepared / "prepared_index.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    counts = Counter((row["split"], row["label"]) for row in rows)
    return {split: {label: counts[(split, label)] for label in ("NORMAL", "PNEUMONIA")}
            for split in ("train", "validation", "test")}
