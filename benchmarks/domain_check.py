"""How often the out-of-domain check fires, per set of images, as the app runs it (`Service.analyze_files`, every
rule the model folder has): the pediatric validation and test splits, the test originals, the adult patient folds
(held_out: neither fitted nor chosen on), a corpus of non-X-rays written to --corpus_dir; and the kind model's time
per decoded image. --measure FOLDER... measures those folders instead; --quick 64 images a set.
"""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from benchmarks.harness import interleaved, markdown_table, options, percentiles, spread, write_results
from pneumonia_vit.images import InvalidImageError, read_xray
from pneumonia_vit.ood.check import PEDIATRIC, RULES, KindModel, check_input
from pneumonia_vit.ood.corpus import SYNTHETIC_FAMILIES, adult_files, heavy_crop, image_files, synthetic_image
from pneumonia_vit.serving.service import Service

CORPUS_SEED = 7  # the kind model's fit draws with ood.fit.SEED; this corpus with another seed
EXPLANATION = (
    "Flagged: any rule fired; the columns after the goal count each rule (ood/check.py) on its own, `features only` "
    "the images that rule 4 alone flagged, and `kind model alone` what rule 3 flags without the classifier's child "
    "score. The held_out adults and the test split were used neither to fit the check nor to set its cut-offs; the "
    "non-X-ray corpus is drawn with another seed than the fit's drawn images (docs/out_of_domain.md).")


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
    terrain = 255 * (terrain - terrain.min()) / np.ptp(terrain)
    samples["terrain_elevation_grey.png"] = Image.fromarray(terrain.astype(np.uint8))
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
    alterations = {"rotated90": lambda film: film.transpose(Image.Transpose.ROTATE_90),
                   "rotated270": lambda film: film.transpose(Image.Transpose.ROTATE_270),
                   "inverted": ImageOps.invert, "crop": lambda film: heavy_crop(film, rng)}
    chosen = [films[i] for i in rng.choice(len(films), size=altered_per_kind * 4, replace=False)]
    for index, path in enumerate(chosen):
        kind = list(alterations)[index % 4]
        images[f"film_{kind}_{path.stem}.png"] = alterations[kind](read_xray(path).image)
    for name, image in images.items():
        image.save(folder / name)
    return [folder / name for name in images]


def measure(service: Service, paths: list[Path]) -> dict:
    """How often each rule fires on `paths`; `passed` lists the files no rule flagged."""
    counts, looks_like, passed = Counter(), Counter(), []
    for path, analysis in zip(paths, service.analyze_files(paths)):
        if isinstance(analysis, InvalidImageError):
            counts["unreadable"] += 1
            continue
        check = analysis.domain
        counts["images"] += 1
        counts["flagged"] += not check.in_domain
        counts.update(check.fired)
        counts["features_only"] += check.fired == ["features"]
        if check.kind_probabilities is not None:  # what rule 3 would say without the child score
            counts["kind_model_alone"] += check.kind_probabilities[PEDIATRIC] < service.kind_model.threshold
        looks_like[check.looks_like] += 1
        if check.in_domain:
            passed.append(path.name)
    result = {key: counts[key] for key in ("images", "flagged", *RULES, "features_only", "kind_model_alone",
                                           "unreadable")}
    result["flagged_fraction"] = round(counts["flagged"] / counts["images"], 4) if counts["images"] else None
    return {**result, "looks_like": dict(looks_like), "passed": passed}


def check_milliseconds(kind_model: KindModel, paths: list[Path], repeats: int = 2) -> dict[str, float]:
    """Median time of rule 3 per image on already decoded images: the thumbnail (check_input), the
    network, and the two together."""
    images = [read_xray(path).image for path in paths]
    inputs = [check_input(image) for image in images]
    times = interleaved({"thumbnail": lambda i: check_input(images[i % len(images)]),
                         "network": lambda i: kind_model.probabilities(inputs[i % len(images)]),
                         "total": lambda i: kind_model.probabilities(check_input(images[i % len(images)]))},
                        repeats * len(images), warmup=0)
    return {part: percentiles(seconds)["p50_ms"] for part, seconds in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = options(__doc__, "model", "data_dir", "originals", "adult_dir")
    parser.add_argument("--corpus_dir", type=Path, default=Path("outputs/non_xray_corpus"),
                        help="where to write the non-X-ray corpus (drawn with the test split's films)")
    parser.add_argument("--measure", nargs="+", type=Path, metavar="FOLDER", help="measure these folders instead")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    folder = args.model
    service = Service.load(str(folder))

    def chosen(paths: list[Path]) -> list[Path]:
        return spread(paths, 64) if args.quick else paths

    if args.measure:  # name, files, goal, expect_flagged
        sets = [(str(folder), image_files(folder), "", False) for folder in args.measure]
    else:
        test_films = image_files(args.data_dir / "test")
        sets = [("pediatric validation split", image_files(args.data_dir / "validation"), "<= 2%", False),
                ("pediatric test split", test_films, "<= 2%", False),
                ("pediatric test originals (full size)", image_files(args.originals / "test"), "<= 2%", False),
                *((f"adult NIH patients, {fold} fold", adult_files(args.adult_dir, fold), goal, True)
                  for fold, goal in (("held_out", ">= 95%"), ("select", ""), ("fit", ""))),
                ("non-X-ray corpus", write_non_xray_corpus(args.corpus_dir, test_films), "100%", True)]
    rows = []
    for name, paths, goal, expect_flagged in sets:
        row = {"set": name, "goal": goal, "expect_flagged": expect_flagged, **measure(service, chosen(paths))}
        print(json.dumps({k: v for k, v in row.items() if k != "passed" or expect_flagged}), flush=True)
        rows.append(row)
    data = {"model": folder.name, "sets": rows}
    table = markdown_table(["Set", "Images", "Flagged", "Rate", "Goal", *RULES, "features only", "kind model alone"],
                           [[row["set"], row["images"], row["flagged"], f"{100 * row['flagged'] / row['images']:.1f}%",
                             row["goal"], *(row[rule] for rule in RULES), row["features_only"],
                             row["kind_model_alone"]] for row in rows])
    sections = [f"### Out-of-domain check: how often it flags each set\n\nModel: `{folder.name}`. {EXPLANATION}\n\n"
                + table]
    if service.kind_model is not None and not args.measure:
        ms = data["kind_model_ms_per_image"] = check_milliseconds(service.kind_model,
                                                                  chosen(image_files(args.originals / "test")))
        sections.append(f"Kind model (rule 3) time per decoded image, median over the full-size test originals: "
                        f"{ms['total']:.2f} ms (thumbnail {ms['thumbnail']:.2f} ms, network {ms['network']:.2f} ms).")
    sections += [f"Not flagged in {row['set']}: " + ", ".join(row["passed"])
                 for row in rows if row["expect_flagged"] and row["passed"]]
    write_results("domain_check", args, data, sections)
    return 0

if __name__ == "__main__":
    sys.exit(main())
