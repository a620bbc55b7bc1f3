"""Inference speed, start-up cost and accuracy: the plain fp32 `transformers.pipeline` (the baseline of every ratio)
against this project's paths, torch fp32 (`Classifier.load(folder, fast=False)`) and the fast path
(`Classifier.load(folder)`), for the bundled model and ViT-B/16 (random weights, 224 px).

Each path is timed from the file (prepared PGMs and full-resolution JPEG originals), preprocessing included, the
candidates round-robin in one process. Also: start-up (the fast path with an empty and a warm cache), the other
backends tried (forward only), and the bundled model's accuracy and ROC-AUC on the official test split (goal: the fast
path within 0.5 points of the pipeline). --quick: fewer iterations and a 64-image accuracy subset.
"""

from __future__ import annotations

import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.harness import (
    VIT_BASE,
    interleaved,
    labelled_files,
    models,
    options,
    percentiles,
    section,
    spread,
    verdict,
    write_results,
)
from pneumonia_vit.cpus import usable_cores
from pneumonia_vit.images import load_xray
from pneumonia_vit.inference.classifier import Classifier
from pneumonia_vit.training.evaluation import binary_metrics

PIPELINE, TORCH, FAST = PATHS = ("pipeline fp32", "ours, torch fp32", "ours, fast")
# Calls per candidate (batch 1, batch 8, forward only of the backends tried) by (ViT-B/16, --quick).
ITERATIONS = {(False, False): (200, 50, 200), (False, True): (20, 5, 20), (True, False): (40, 15, 30),
              (True, True): (3, 1, 5)}


def load_all(folder: Path) -> tuple[dict, dict]:
    """The three paths, and what each cost to start (the fast path with an empty and a warm cache)."""
    from transformers import pipeline

    def timed(load):
        start = time.perf_counter()
        return load(), time.perf_counter() - start

    startup = {}
    pipe, startup["pipeline_s"] = timed(lambda: pipeline("image-classification", model=str(folder), device="cpu"))
    exact, startup["torch_s"] = timed(lambda: Classifier.load(str(folder), fast=False))
    with tempfile.TemporaryDirectory(prefix="fast-cache-") as cache:
        cold, startup["fast_cold_s"] = timed(lambda: Classifier.load(str(folder), cache=cache))
        if cold.backend.name != "onnxruntime-int8":
            raise SystemExit("the fast path did not load (see the warning above): pip install onnxruntime onnx")
        startup["fast_cold_detail"] = cold.backend.startup
        startup["artefact_mb"] = Path(cold.backend.path).stat().st_size / 2**20
        del cold
        fast, startup["fast_warm_s"] = timed(lambda: Classifier.load(str(folder), cache=cache))
        startup["fast_warm_detail"] = fast.backend.startup
    return {PIPELINE: pipe, TORCH: exact, FAST: fast}, startup


def speed(paths: dict, files: list[Path], originals: list[Path], iterations: int, batch_iterations: int) -> dict:
    pipe, side = paths[PIPELINE], paths[FAST].spec.size

    def ours(classifier, source, batch=1):
        return lambda i: classifier.pneumonia_probability(
            [load_xray(source[(batch * i + k) % len(source)], draft_size=side) for k in range(batch)])

    results = {}
    with torch.inference_mode():
        for label, source in (("prepared", files), ("originals", originals)):
            if source:
                times = interleaved({PIPELINE: lambda i, s=source: pipe(Image.open(s[i % len(s)]), top_k=2),
                                     TORCH: ours(paths[TORCH], source), FAST: ours(paths[FAST], source)}, iterations)
                results[f"batch1_{label}"] = {name: percentiles(t) for name, t in times.items()}
        times = interleaved({
            PIPELINE: lambda i: pipe([Image.open(files[(8 * i + k) % len(files)]) for k in range(8)], batch_size=8,
                                     top_k=2),
            TORCH: ours(paths[TORCH], files, 8), FAST: ours(paths[FAST], files, 8)}, batch_iterations, warmup=1)
    results["batch8_prepared"] = {name: {**percentiles(t), "images_per_s": 8 / (percentiles(t)["p50_ms"] / 1000)}
                                  for name, t in times.items()}
    return results


def backends_tried(folder: Path, exact: Classifier, image: Image.Image, iterations: int) -> dict:
    """Forward-only batch-1 latency of the other backends tried, on one preprocessed real X-ray."""
    from transformers import AutoModelForImageClassification

    from pneumonia_vit.inference import fast_path
    from pneumonia_vit.preprocess import pixel_values

    model = exact.model
    pixels = pixel_values([image], exact.spec)
    array = pixels.numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated (in favour of torchao)
        dynamic_int8 = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    bf16 = AutoModelForImageClassification.from_pretrained(folder, dtype=torch.bfloat16).eval()
    sessions = {}
    with tempfile.TemporaryDirectory(prefix="options-") as work:
        fp32_path = Path(work) / "fp32.onnx"
        fast_path.export_onnx(model, exact.spec, fp32_path)
        fast_path.quantize_int8(fp32_path, Path(work) / "int8_tensor.onnx", per_channel=False)
        fast_path.quantize_int8(fp32_path, Path(work) / "int8_channel.onnx", per_channel=True)
        default = usable_cores()
        for name, file, count in (("onnxruntime fp32", "fp32.onnx", default),
                                  ("onnxruntime int8 per-tensor", "int8_tensor.onnx", default),
                                  (f"onnxruntime int8 per-channel, {default} threads (the fast path)",
                                   "int8_channel.onnx", default),
                                  ("onnxruntime int8 per-channel, 1 thread", "int8_channel.onnx", 1)):
            sessions[name] = fast_path.OnnxBackend(Path(work) / file, count)
    reference_name = "torch fp32 (SDPA attention)"
    candidates = {
        reference_name: lambda: model(pixel_values=pixels).logits.numpy(),
        "torch bf16": lambda: bf16(pixel_values=pixels.bfloat16()).logits.float().numpy(),
        "torch dynamic int8 (torch.ao, deprecated)": lambda: dynamic_int8(pixel_values=pixels).logits.numpy(),
        **{name: (lambda s=session: s.run(array)[0]) for name, session in sessions.items()},
    }
    with torch.inference_mode():
        reference = candidates[reference_name]()
        errors = {name: float(np.abs(run() - reference).max()) for name, run in candidates.items()}
        times = interleaved({name: (lambda i, r=run: r()) for name, run in candidates.items()}, iterations)
    base = percentiles(times[reference_name])["p50_ms"]
    return {name: {**percentiles(t), "speedup_vs_torch_fp32": base / percentiles(t)["p50_ms"],
                   "max_abs_logit_diff": errors[name]} for name, t in times.items()}


def accuracy(paths: dict, test_files: list[tuple[Path, int]], originals: list[tuple[Path, int]]) -> dict:
    """Accuracy and ROC-AUC at the stored threshold of each path, and how far each is from the pipeline's."""
    pipe, fast = paths[PIPELINE], paths[FAST]
    results = {}
    for label, files in (("prepared test split", test_files), ("test originals", originals)):
        if not files:
            continue
        labels = np.array([y for _, y in files])
        scores = {name: [] for name in PATHS}
        with torch.inference_mode():
            for start in range(0, len(files), 8):
                chunk = [path for path, _ in files[start:start + 8]]
                outputs = pipe([Image.open(p) for p in chunk], batch_size=8, top_k=2)
                scores[PIPELINE].append([{row["label"]: row["score"] for row in rows}["PNEUMONIA"] for rows in outputs])
                grays = [load_xray(p, draft_size=fast.spec.size) for p in chunk]
                scores[TORCH].append(paths[TORCH].pneumonia_probability(grays))
                scores[FAST].append(fast.pneumonia_probability(grays))
        scores = {name: np.concatenate(parts) for name, parts in scores.items()}
        base = binary_metrics(labels, scores[PIPELINE], fast.threshold)
        results[label] = {}
        for name, s in scores.items():
            metrics = binary_metrics(labels, s, fast.threshold)
            results[label][name] = {
                **{k: metrics[k] for k in ("n", "accuracy", "roc_auc", "sensitivity", "specificity")},
                "accuracy_change_points": 100 * (metrics["accuracy"] - base["accuracy"]),
                "roc_auc_change_points": 100 * (metrics["roc_auc"] - base["roc_auc"]),
                "max_abs_p_diff": float(np.abs(s - scores[PIPELINE]).max()),
                "decisions_changed": int(((s >= fast.threshold) != (scores[PIPELINE] >= fast.threshold)).sum()),
            }
    return results


def rows_and_verdicts(name: str, result: dict, tables: dict[str, list]) -> list[str]:
    """Adds the model's rows to `tables`; returns its verdicts."""
    speeds, startup = result["speed"], result["startup"]
    base1, base8 = speeds["batch1_prepared"][PIPELINE]["p50_ms"], speeds["batch8_prepared"][PIPELINE]["images_per_s"]
    for path in PATHS:
        one, eight = speeds["batch1_prepared"][path], speeds["batch8_prepared"][path]
        original = speeds.get("batch1_originals", {}).get(path, {})
        tables["speed"].append([name, path, one["p50_ms"], one["p95_ms"], original.get("p50_ms", "-"),
                                original.get("p95_ms", "-"), eight["images_per_s"], f"{base1 / one['p50_ms']:.2f}x",
                                f"{eight['images_per_s'] / base8:.2f}x"])
    tables["startup"].append([name, startup["pipeline_s"], startup["torch_s"], startup["fast_cold_s"],
                              startup["fast_cold_detail"].get("export_quantize_s", 0.0), startup["fast_warm_s"],
                              startup["artefact_mb"]])
    for backend, values in result.get("options", {}).items():
        tables["options"].append([name, backend, values["p50_ms"], values["p95_ms"],
                                  f"{values['speedup_vs_torch_fp32']:.2f}x", f"{values['max_abs_logit_diff']:.2g}"])
    verdicts = []
    for split, by_path in result.get("accuracy", {}).items():
        for path, m in by_path.items():
            tables["accuracy"].append([name, split, path, m["n"], f"{100 * m['accuracy']:.2f}",
                                       f"{100 * m['roc_auc']:.2f}", f"{m['accuracy_change_points']:+.2f}",
                                       f"{m['roc_auc_change_points']:+.2f}", f"{m['max_abs_p_diff']:.4f}",
                                       m["decisions_changed"]])
        accuracy_change, auc_change = by_path[FAST]["accuracy_change_points"], by_path[FAST]["roc_auc_change_points"]
        verdicts.append(verdict(f"{name}, {split}: fast path accuracy {accuracy_change:+.2f} points, ROC-AUC "
                                f"{auc_change:+.2f} points vs the pipeline (goal: within 0.5)",
                                max(abs(accuracy_change), abs(auc_change)) <= 0.5))
    fast1 = speeds["batch1_prepared"][FAST]["p50_ms"]
    if name == VIT_BASE:
        return verdicts + [verdict(f"{name}: fast path p50 at batch 1 is {base1 / fast1:.2f}x faster than the fp32 "
                                   "pipeline (goal >= 3x)", base1 / fast1 >= 3)]
    original = speeds.get("batch1_originals", {}).get(FAST, {}).get("p50_ms")
    return verdicts + [verdict(f"{name}: fast path p50 per image {fast1:.1f} ms on prepared PGMs"
                               + (f", {original:.1f} ms on full-resolution JPEG originals" if original else "")
                               + " (goal < 20 ms)", fast1 < 20 and (original or 0) < 20)]


def main(argv=None) -> int:
    parser = options(__doc__, "model", "data_dir", "originals")
    parser.add_argument("--skip-vit-base", action="store_true")
    args = parser.parse_args(argv)
    test_files = labelled_files(args.data_dir / "test")
    original_files = labelled_files(args.originals / "test") if (args.originals / "test").is_dir() else []
    timing_files, timing_originals = ([path for path, _ in spread(files, 64)] for files in (test_files, original_files))
    if args.quick:
        test_files, original_files = spread(test_files, 64), spread(original_files, 64)

    data = {"models": {}, "args": vars(args)}
    tables, verdicts = {"speed": [], "startup": [], "options": [], "accuracy": []}, []
    for name, folder in models(args.model, vit_base=not args.skip_vit_base):
        is_base = name == VIT_BASE
        batch1, batch8, forward = ITERATIONS[is_base, args.quick]
        print(f"\n== {name}: {folder}", flush=True)
        paths, startup = load_all(folder)
        print(f"start-up: {startup}", flush=True)
        result = {"folder": str(folder), "startup": startup,
                  "speed": speed(paths, timing_files, timing_originals, batch1, batch8)}
        if not (args.quick and is_base):
            print("other backends ...", flush=True)
            image = load_xray(timing_files[0], draft_size=paths[FAST].spec.size)
            result["options"] = backends_tried(folder, paths[TORCH], image, forward)
        if not is_base:
            print("accuracy ...", flush=True)
            result["accuracy"] = accuracy(paths, test_files, original_files)
        data["models"][name] = result
        verdicts += rows_and_verdicts(name, result, tables)

    write_results("inference", args, data, [
        section("Latency and throughput (file -> P(PNEUMONIA), preprocessing included)",
                ["model", "path", "batch 1 p50 ms", "p95 ms", "originals p50 ms", "originals p95 ms",
                 "batch 8 images/s", "p50 speed-up", "images/s speed-up"], tables["speed"]),
        section("Start-up (seconds; the fast path's first load exports and quantizes into the cache once)",
                ["model", "pipeline", "torch fp32", "fast, empty cache", "of which export + quantize",
                 "fast, warm cache", "int8 ONNX MB"], tables["startup"]),
        section("Backends tried (forward only, batch 1, one real X-ray)",
                ["model", "backend", "p50 ms", "p95 ms", "vs torch fp32", "max |logit diff|"], tables["options"]),
        section("Accuracy at the stored threshold (official test split)",
                ["model", "images", "path", "n", "accuracy %", "ROC-AUC %", "Δ accuracy (points)", "Δ AUC (points)",
                 "max |Δp|", "decisions changed"], tables["accuracy"]),
    ], verdicts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
