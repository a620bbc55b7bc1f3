"""Inference speed, start-up cost and accuracy: the plain `transformers.pipeline` against this
project's serving path, for ViT-B/16 (random weights, 224 px: the cost of google/vit-base-patch16-224)
and the bundled model (models/pneumonia-vit-tiny, 128 px).

    python -m benchmarks.inference
    python -m benchmarks.inference --model runs/smoke --skip-vit-base   # another trained model

Timed paths, each including reading the file and all preprocessing:
- pipeline fp32: `pipeline("image-classification", model=folder)(Image.open(path))`, what every
  user starts from (baseline of every ratio);
- ours, torch fp32: `load_xray(path, draft_size=side)` -> `pixel_values` -> the PyTorch model
  (`Classifier.load(folder, fast=False)`);
- ours, fast: `load_xray(path, draft_size=side)` -> `pixel_array` -> ONNX Runtime, int8 weights
  (`Classifier.load(folder)`, see pneumonia_vit/inference/fast_path.py).
Batch 1: p50 / p95 latency over the official test split as prepared (224 px PGMs) and over the
full-resolution test originals (JPEGs, where draft decoding matters). Batch 8: images/s.
The candidates run round-robin in one process so that load changes hit them alike.

Also: start-up (pipeline, torch, fast path with an empty cache = one-off export + quantization,
fast path with a warm cache), forward-only latency of the other backends tried (torch bf16, torch
dynamic int8, ONNX Runtime fp32 / int8 per tensor, 1 thread), and accuracy / ROC-AUC of the
bundled model on the official test split for the pipeline and the fast path (goal: within 0.5
points). --quick: fewer iterations and a 64-image accuracy subset.
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
    goals,
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


def pipeline_p_pneumonia(outputs) -> np.ndarray:
    """P(PNEUMONIA) from the pipeline's output for a list of images."""
    return np.array([{row["label"]: row["score"] for row in rows}["PNEUMONIA"] for rows in outputs])


def load_all(folder: Path, threads: int | None) -> tuple[dict, dict]:
    """The three paths, and what each cost to start (the fast path with an empty and a warm cache)."""
    from transformers import pipeline

    def timed(load):
        start = time.perf_counter()
        return load(), time.perf_counter() - start

    startup = {}
    pipe, startup["pipeline_s"] = timed(lambda: pipeline("image-classification", model=str(folder), device="cpu"))
    exact, startup["torch_s"] = timed(lambda: Classifier.load(str(folder), fast=False))
    with tempfile.TemporaryDirectory(prefix="fast-cache-") as cache:
        cold, startup["fast_cold_s"] = timed(lambda: Classifier.load(str(folder), threads=threads, cache=cache))
        if cold.backend.name != "onnxruntime-int8":
            raise SystemExit("the fast path did not load (see the warning above): pip install onnxruntime onnx")
        startup["fast_cold_detail"] = cold.backend.startup
        startup["artefact_mb"] = Path(cold.backend.path).stat().st_size / 2**20
        del cold
        fast, startup["fast_warm_s"] = timed(lambda: Classifier.load(str(folder), threads=threads, cache=cache))
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
            PIPELINE: lambda i: pipe([Image.open(files[(8 * i + k) % len(files)]) for k in range(8)], batch_size=8, top_k=2),
            TORCH: ours(paths[TORCH], files, 8), FAST: ours(paths[FAST], files, 8)}, batch_iterations, warmup=1)
    results["batch8_prepared"] = {name: {**percentiles(t), "images_per_s": 8 / (percentiles(t)["p50_ms"] / 1000)}
                                  for name, t in times.items()}
    return results


def backends_tried(folder: Path, exact: Classifier, image: Image.Image, iterations: int, threads: int | None) -> dict:
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
        default = threads or usable_cores()
        for name, file, count in (("onnxruntime fp32", "fp32.onnx", default),
                                  ("onnxruntime int8 per-tensor", "int8_tensor.onnx", default),
                                  (f"onnxruntime int8 per-channel, {default} threads (the fast path)", "int8_channel.onnx", default),
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
                scores[PIPELINE].append(pipeline_p_pneumonia(pipe([Image.open(p) for p in chunk], batch_size=8, top_k=2)))
                grays = [load_xray(p, draft_size=fast.spec.size) for p in chunk]
                scores[TORCH].append(paths[TORCH].pneumonia_probability(grays))
                scores[FAST].append(fast.pneumonia_probability(grays))
        scores = {name: np.concatenate(s) for name, s in scores.items()}
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


def report(name: str, result: dict, tables: dict[str, list]) -> list[str]:
    """Adds the model's rows to `tables`; returns its verdicts."""
    s, startup = result["speed"], result["startup"]
    base1 = s["batch1_prepared"][PIPELINE]["p50_ms"]
    base8 = s["batch8_prepared"][PIPELINE]["images_per_s"]
    for path in PATHS:
        b1, b8 = s["batch1_prepared"][path], s["batch8_prepared"][path]
        orig = s.get("batch1_originals", {}).get(path, {})
        tables["speed"].append([name, path, b1["p50_ms"], b1["p95_ms"], orig.get("p50_ms", "-"), orig.get("p95_ms", "-"),
                                b8["images_per_s"], f"{base1 / b1['p50_ms']:.2f}x", f"{b8['images_per_s'] / base8:.2f}x"])
    tables["startup"].append([name, startup["pipeline_s"], startup["torch_s"], startup["fast_cold_s"],
                              startup["fast_cold_detail"].get("export_quantize_s", 0.0), startup["fast_warm_s"],
                              startup["artefact_mb"]])
    for backend, values in result.get("options", {}).items():
        tables["options"].append([name, backend, values["p50_ms"], values["p95_ms"],
                                  f"{values['speedup_vs_torch_fp32']:.2f}x", f"{values['max_abs_logit_diff']:.2g}"])
    verdicts = []
    for split, by_path in result.get("accuracy", {}).items():
        for path, m in by_path.items():
            tables["accuracy"].append([name, split, path, m["n"], f"{100 * m['accuracy']:.2f}", f"{100 * m['roc_auc']:.2f}",
                                       f"{m['accuracy_change_points']:+.2f}", f"{m['roc_auc_change_points']:+.2f}",
                                       f"{m['max_abs_p_diff']:.4f}", m["decisions_changed"]])
        fast_m = by_path[FAST]
        verdicts.append(verdict(f"{name}, {split}: fast path accuracy {fast_m['accuracy_change_points']:+.2f} points, "
                                f"ROC-AUC {fast_m['roc_auc_change_points']:+.2f} points vs the pipeline (goal: within 0.5)",
                                max(abs(fast_m["accuracy_change_points"]), abs(fast_m["roc_auc_change_points"])) <= 0.5))
    fast1 = s["batch1_prepared"][FAST]["p50_ms"]
    if name == VIT_BASE:
        verdicts.append(verdict(f"{name}: fast path p50 at batch 1 is {base1 / fast1:.2f}x faster than the fp32 "
                                f"pipeline (goal >= 3x)", base1 / fast1 >= 3))
    else:
        orig = s.get("batch1_originals", {}).get(FAST, {}).get("p50_ms")
        verdicts.append(verdict(f"{name}: fast path p50 per image {fast1:.1f} ms on prepared PGMs"
                                + (f", {orig:.1f} ms on full-resolution JPEG originals" if orig else "")
                                + " (goal < 20 ms)", fast1 < 20 and (orig or 0) < 20))
    return verdicts


def main(argv=None) -> int:
    parser = options(__doc__, "model", "data_dir", "originals")
    parser.add_argument("--skip-vit-base", action="store_true")
    parser.add_argument("--skip-options", action="store_true", help="skip the other-backends comparison")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads for torch and ONNX Runtime alike (default: all cores)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick
    test_files = labelled_files(args.data_dir / "test")
    original_files = labelled_files(args.originals / "test") if (args.originals / "test").is_dir() else []
    timing_files = [path for path, _ in spread(test_files, 64)]
    timing_originals = [path for path, _ in spread(original_files, 64)]

    data = {"models": {}, "args": vars(args)}
    tables, verdicts = {"speed": [], "startup": [], "options": [], "accuracy": []}, []
    for name, folder, trained in models(args.model, vit_base=not args.skip_vit_base):
        is_base = name == VIT_BASE
        print(f"\n== {name}: {folder}", flush=True)
        paths, startup = load_all(folder, args.threads)
        print(f"start-up: {startup}", flush=True)
        result = {"folder": str(folder), "startup": startup,
                  "speed": speed(paths, timing_files, timing_originals, (3 if quick else 40) if is_base else (20 if quick else 200),
                                 (1 if quick else 15) if is_base else (5 if quick else 50))}
        if not args.skip_options and not (quick and is_base):
            print("other backends ...", flush=True)
            result["options"] = backends_tried(folder, paths[TORCH], load_xray(timing_files[0], draft_size=paths[FAST].spec.size),
                                               (5 if quick else 30) if is_base else (20 if quick else 200), args.threads)
        if not is_base and trained:
            print("accuracy ...", flush=True)
            result["accuracy"] = accuracy(paths, spread(test_files, 64) if quick else test_files,
                                          spread(original_files, 64) if quick else original_files)
        data["models"][name] = result
        verdicts += report(name, result, tables)

    markdown = "\n\n".join(filter(None, [
        section("Latency and throughput (file -> P(PNEUMONIA), preprocessing included)",
                ["model", "path", "batch 1 p50 ms", "p95 ms", "originals p50 ms", "originals p95 ms", "batch 8 images/s",
                 "p50 speed-up", "images/s speed-up"], tables["speed"]),
        section("Start-up (seconds; the fast path's first load exports and quantizes into the cache once)",
                ["model", "pipeline", "torch fp32", "fast, empty cache", "of which export + quantize", "fast, warm cache",
                 "int8 ONNX MB"], tables["startup"]),
        section("Backends tried (forward only, batch 1, one real X-ray)",
                ["model", "backend", "p50 ms", "p95 ms", "vs torch fp32", "max |logit diff|"], tables["options"]),
        section("Accuracy at the stored threshold (official test split)",
                ["model", "images", "path", "n", "accuracy %", "ROC-AUC %", "Δ accuracy (points)", "Δ AUC (points)",
                 "max |Δp|", "decisions changed"], tables["accuracy"]),
        goals(verdicts),
    ]))
    data["verdicts"] = verdicts
    write_results("inference", quick, data, markdown, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
