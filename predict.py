"""Predict every image in a folder and write one CSV row per file.

    python predict.py path/to/xrays                      # -> path/to/xrays/predictions.csv
    python predict.py path/to/xrays --output out.csv --model you/pneumonia-vit --recursive

Columns: file (relative to the folder), p_normal, p_pneumonia, decision (at the model's stored
threshold; empty where the image is out of domain: no diagnosis is given there, as on every way in),
out_of_domain (empty, or why the image does not look like the training X-rays), error (empty, or why
the file could not be read; the other columns are then empty). Every file is listed, including files
that are not images, so nothing is dropped silently. The model is served as by app.py, with the same
environment settings (pneumonia_vit/settings.py).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pneumonia_vit.images import InvalidImageError
from pneumonia_vit.settings import ServingSettings

if TYPE_CHECKING:
    from pneumonia_vit.serving.service import Service

COLUMNS = ("file", "p_normal", "p_pneumonia", "decision", "out_of_domain", "error")


def list_files(folder: Path, recursive: bool, skip: Path | None = None) -> list[Path]:
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        path for path in candidates
        if path.is_file() and not path.name.startswith(".") and (skip is None or path.resolve() != skip.resolve())
    )


def predict_folder(service: Service, folder: Path, output: Path, recursive: bool = False, batch_size: int = 32) -> dict:
    """Writes the CSV, `batch_size` rows at a time (the results held in memory); returns counts."""
    files = list_files(folder, recursive, skip=output)
    counts = {"files": len(files), "predicted": 0, "errors": 0, "out_of_domain": 0}
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            for path, result in zip(chunk, service.analyze_files(chunk)):
                row = {"file": path.relative_to(folder).as_posix()}
                if isinstance(result, InvalidImageError):
                    row["error"] = str(result)
                    counts["errors"] += 1
                else:
                    row.update(result.answer("csv"))
                    counts["predicted"] += 1
                    counts["out_of_domain"] += result.decision is None
                writer.writerow(row)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="folder of PNG, JPEG or DICOM chest X-rays")
    parser.add_argument("--output", type=Path, default=None, help="CSV to write (default: FOLDER/predictions.csv)")
    parser.add_argument("--model", default=None, help="Hub id or local folder (default: $MODEL_ID, else the bundled model)")
    parser.add_argument("--recursive", action="store_true", help="include files in sub-folders")
    parser.add_argument("--batch_size", type=int, default=32, help="rows written at a time (each file is read alone)")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"{args.folder}: no such folder")
    output = args.output or args.folder / "predictions.csv"
    if not args.recursive and not list_files(args.folder, recursive=False, skip=output) and any(
        path.is_dir() and not path.name.startswith(".") for path in args.folder.iterdir()
    ):
        parser.error(f"{args.folder} holds only sub-folders: add --recursive to predict the files in them")
    settings = ServingSettings.from_environment(os.environ)
    model_id = args.model or settings.model_id
    if model_id is None or Path(model_id).is_dir():
        # A local model never needs the Hub: stay offline, so no lookup can stall on a machine without a network.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from pneumonia_vit.serving.service import Service  # after HF_HUB_OFFLINE: huggingface_hub reads it once, at import

    service = Service.load(model_id, **settings.fast_path())
    counts = predict_folder(service, args.folder, output, args.recursive, args.batch_size)
    print(
        f"{counts['predicted']} of {counts['files']} files predicted ({counts['errors']} unreadable, "
        f"{counts['out_of_domain']} out of domain) with {service.model_id}, threshold {service.threshold:.3f} -> {output}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
