"""How often the out-of-domain check fires, per set of images, as the app runs it (every rule the
model folder has, through `serving.Service`):

    python -m benchmarks.domain_check --model models/pneumonia-vit-tiny \\
        --data_dir data/chest_xray_prepared --adult_dir ../shared/data/adult_cxr_224 \\
        --originals ../shared/data/chest_xray_originals --output benchmarks/results/domain_check.md
    python -m benchmarks.domain_check --model MODEL_DIR --measure FOLDER [FOLDER ...]

Sets: the pediatric validation and test splits (prepared), the full-resolution test originals, the
adult images per patient fold of ood.corpus.adult_fold (held_out: patients the check was
neither fitted nor chosen on), and a corpus of non-X-rays written to --corpus_dir
(`write_non_xray_corpus`). Prints one JSON line per set; --output also writes a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from pneumonia_vit.images import InvalidImageError, read_xray
from pneumonia_vit.ood.check import PEDIATRIC, RULES, KindModel, check_input
from pneumonia_vit.ood.corpus import SYNTHETIC_FAMILIES, adult_files, heavy_crop, image_files, synthetic_image
from pneumonia_vit.serving.service import Service

log = logging.getLogger(__name__)

CORPUS_SEED = 7  # the kind model's fit draws with ood.fit.SEED; this corpus with another seed


def _matplotlib_samples() -> dict[str, Image.Image]:
    """The sample images matplotlib ships: a photograph, an MRI slice, terrain and logos."""
    from matplotlib import cbook

    samples = {}
    photo = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    samples["photo_grace_hopper_colour.png"] = photo.convert("RGB")
    samples["photo_grace_hopper_grey.png"] = photo.convert("L")
    with cbook.get_sample_data("s1045.ima.gz") as handle:  # a 256x256 16-bit MRI slice of a head
        mri = np.frombuffer(handle.read(), np.uint16).astype(np.float32).reshape(256, 256)
    samples["mri_head_slice.png"] = Image.fromarray((255 * mri / mri.max()).astype(np.uint8))
    terrain = cbook.get_sample_data("jacksboro_fault_dem.npz")["elevation"].astype(np.float32)
    samples["terrain_elevation_grey.png"] = Image.fromarray((255 * (terrain - terrain.min()) / np.ptp(terrain)).astype(np.uint8))
    for name in ("logo2.png", "Minduka_Present_Blue_Pack.png"):
        image = Image.open(cbook.get_sample_data(name, asfileobj=False))
        samples[f"drawing_{Path(name).stem}.png"] = image.convert("RGB")
        samples[f"drawing_{Path(name).stem}_grey.png"] = image.convert("L")
    return samples


def write_non_xray_corpus(folder: str | Path, films: list[Path], seed: int = CORPUS_SEED, per_family: int = 6,
                          altered_per_kind: int = 8) -> list[Path]:
    """Writes the non-X-ray test corpus: per synthetic family `per_family` images (half grey, half in
    colour), matplotlib's sample images, and chest `films` (the test split's) turned 90 degrees,
    inverted or cropped to a small part. Returns the files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = {}
    for family in SYNTHETIC_FAMILIES:
        for index in range(per_family):
            grey = index % 2 == 0
            images[f"{family}_{index}_{'grey' if grey else 'colour'}.png"] = synthetic_image(rng, family, grey)[1]
    images.update(_matplotlib_samples())
    chosen = [films[i] for i in rng.choice(len(films), size=altered_per_kind * 4, replace=False)]
    for index, path in enumerate(chosen):
        film = read_xray(path).image
        kind = ("rotated90", "rotated270", "inverted", "crop")[index % 4]
        if kind == "rotated90":
            film = film.transpose(Image.Transpose.ROTATE_90)
        elif kind == "rotated270":
            film = film.transpose(Image.Transpose.ROTATE_270)
        elif kind == "inverted":
            film = ImageOps.invert(film)
        else:
            film = heavy_crop(film, rng)
        images[f"film_{kind}_{path.stem}.png"] = film
    paths = []
    for name, image in images.items():
        path = folder / name
        image.save(path)
        paths.append(path)
    return paths


def measure(service: Service, paths: list[Path], batch_size: int = 32) -> dict:
    """How often each rule fires on `paths`; `passed` lists the files no rule flagged."""
    counts = Counter()
    looks_like = Counter()
    passed = []
    for start in range(0, len(paths), batch_size):
        readings, names = [], []
        for path in paths[start : start + batch_size]:
            try:
                readings.append(read_xray(path))
                names.append(path.name)
            except InvalidImageError:
                counts["unreadable"] += 1
        for name, analysis in zip(names, service.analyze_many(readings, batch_size)):
            check = analysis.domain
            counts["images"] += 1
            counts["flagged"] += not check.in_domain
            counts.update(check.fired)
            counts["features_only"] += check.fired == ["features"]
            if check.kind_probabilities is not None:  # what rule 3 would say without the child score
                counts["kind_model_alone"] += check.kind_probabilities[PEDIATRIC] < service.kind_model.threshold
            looks_like[check.looks_like] += 1
            if check.in_domain:
                passed.append(name)
    result = {key: counts[key] for key in ("images", "flagged", *RULES, "features_only", "kind_model_alone", "unreadable")}
    result["flagged_fraction"] = round(counts["flagged"] / counts["images"], 4) if counts["images"] else None
    result["looks_like"] = dict(looks_like)
    result["passed"] = passed
    return result


def check_milliseconds(kind_model: KindModel, paths: list[Path], repeats: int = 2) -> dict[str, float]:
    """Median time of rule 3 per image on already decoded images: the thumbnail (check_input), the
    network, and the two together."""
    images = [read_xray(path).image for path in paths]
    timings = {"thumbnail": [], "network": [], "total": []}
    for _ in range(repeats):
        for image in images:
            started = time.perf_counter()
            inputs = check_input(image)
            thumbnail_done = time.perf_counter()
            kind_model.probabilities(inputs)
            finished = time.perf_counter()
            timings["thumbnail"].append(thumbnail_done - started)
            timings["network"].append(finished - thumbnail_done)
            timings["total"].append(finished - started)
    return {part: 1000 * float(np.median(values)) for part, values in timings.items()}


def _table(rows: list[dict], model: str, milliseconds: dict[str, float] | None) -> str:
    lines = [
        "# Out-of-domain check: how often it flags each set",
        "",
        f"Model folder: `{model}`. Measured with `python -m benchmarks.domain_check` on "
        f"{platform.machine()} Linux, {platform.python_version()}, {time.strftime('%Y-%m-%d', time.gmtime())}.",
        "Flagged: any rule fired (colour, blank, kind, feature distance); the columns after it "
        "count each rule on its own, `features only` the images that rule 4 alone flagged, and `kind model alone` "
        "what rule 3 flags without the classifier's child score. The kind model and the child score were fitted on the "
        "pediatric train split and the adult `fit` fold, their cut-offs set on the pediatric validation split; the adult "
        "`select` fold was looked at while choosing their design and sets the child score's weight; the `held_out` fold and the test split were not used to "
        "fit them or set their cut-offs. The non-X-ray corpus is drawn with another seed than the fit's drawn images "
        "(same families), plus matplotlib's sample images and altered test-split films.",
        "",
        "| Set | Images | Flagged | Rate | Goal | colour | blank | kind | features | features only | kind model alone |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['set']} | {row['images']} | {row['flagged']} | {100 * row['flagged'] / row['images']:.1f}% | {row.get('goal', '')} "
            f"| {row['colour']} | {row['blank']} | {row['kind']} | {row['features']} | {row['features_only']} "
            f"| {row['kind_model_alone']} |"
        )
    if milliseconds is not None:
        lines += ["", f"Kind model (rule 3) time per decoded image, median over the full-size test "
                      f"originals: {milliseconds['total']:.2f} ms (thumbnail {milliseconds['thumbnail']:.2f} ms, "
                      f"network {milliseconds['network']:.2f} ms)."]
    missed = [(row["set"], row["passed"]) for row in rows if row.get("expect_flagged") and row["passed"]]
    for name, files in missed:
        lines += ["", f"Not flagged in {name}: " + ", ".join(files)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.domain_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model folder (or Hub id) whose domain check to measure")
    parser.add_argument("--data_dir", help="prepared data: its validation/ and test/ splits")
    parser.add_argument("--adult_dir", help="adult_cxr_224/: its images per patient fold")
    parser.add_argument("--originals", help="chest_xray_originals/: its full-resolution test/ split")
    parser.add_argument("--corpus_dir", default="outputs/non_xray_corpus",
                        help="where to write the non-X-ray corpus (needs --data_dir for its test films)")
    parser.add_argument("--measure", nargs="*", default=[], metavar="FOLDER", help="more folders of images to measure")
    parser.add_argument("--output", help="a Markdown file for the table (benchmarks/results/domain_check.md)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    service = Service.load(args.model)
    sets: list[tuple[str, list[Path], str, bool]] = []  # name, files, goal, expect_flagged
    if args.data_dir:
        data_dir = Path(args.data_dir)
        sets.append(("pediatric validation split", image_files(data_dir / "validation"), "<= 2%", False))
        sets.append(("pediatric test split", image_files(data_dir / "test"), "<= 2%", False))
    if args.originals:
        sets.append(("pediatric test originals (full size)", image_files(Path(args.originals) / "test"), "<= 2%", False))
    if args.adult_dir:
        for fold, goal in (("held_out", ">= 95%"), ("select", ""), ("fit", "")):
            sets.append((f"adult NIH patients, {fold} fold", adult_files(args.adult_dir, fold), goal, True))
    if args.data_dir:
        corpus = write_non_xray_corpus(args.corpus_dir, image_files(Path(args.data_dir) / "test"))
        sets.append(("non-X-ray corpus", corpus, "100%", True))
    for folder in args.measure:
        sets.append((folder, image_files(folder), "", False))
    if not sets:
        parser.error("nothing to measure: give --data_dir, --adult_dir, --originals or --measure")

    rows = []
    for name, paths, goal, expect_flagged in sets:
        row = {"set": name, "goal": goal, "expect_flagged": expect_flagged, **measure(service, paths)}
        shown = {k: v for k, v in row.items() if k != "passed" or expect_flagged}
        print(json.dumps(shown), flush=True)
        rows.append(row)
    milliseconds = None
    if service.kind_model is not None and args.originals:
        milliseconds = check_milliseconds(service.kind_model, image_files(Path(args.originals) / "test"))
        print(json.dumps({"kind_model_ms_per_image": {part: round(ms, 3) for part, ms in milliseconds.items()}}))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(_table(rows, args.model, milliseconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
