"""Peak resident memory (RSS) of a process that serves a model: the plain fp32
`transformers.pipeline` against this project's paths, for the bundled model and ViT-B/16
(--quick: the bundled model only).

Each case runs in a fresh subprocess (`python -m benchmarks.memory --child MODEL PATH`): import,
load the model, score 20 real X-rays one at a time, then report its RSS after the imports, after
loading, and the peak (VmHWM). Paths:
- pipeline fp32: `pipeline("image-classification", model=folder)(Image.open(path))`;
- ours, torch fp32: `Classifier.load(folder, fast=False)`, `load_xray(path, draft_size)`;
- ours, fast, first start: `Classifier.load(folder)` with an empty cache (includes the one-off
  ONNX export and quantization, which needs the PyTorch model in memory);
- ours, fast: the same with the cache filled, as every later start of a server.
The cache is a temporary folder of this run, not ~/.cache/pneumonia-vit.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import labelled_files, models, options, section, spread, status_mib, write_results

PIPELINE, TORCH, FAST_FIRST, FAST = PATHS = ("pipeline fp32", "ours, torch fp32", "ours, fast, first start", "ours, fast")
PREDICTIONS = 20


def child(folder: str, path: str, images: list[str], cache: str) -> dict:
    """One case, in this (fresh) process."""
    from PIL import Image

    from pneumonia_vit.images import load_xray
    from pneumonia_vit.inference.classifier import Classifier

    if path == PIPELINE:
        from transformers import pipeline
    after_imports = status_mib("VmRSS")
    start = time.perf_counter()
    if path == PIPELINE:
        model = pipeline("image-classification", model=folder, device="cpu")

        def predict(image_path):
            return model(Image.open(image_path), top_k=2)
    else:
        model = Classifier.load(folder, fast=path != TORCH, cache=cache)
        if path != TORCH and model.backend.name != "onnxruntime-int8":
            raise SystemExit("the fast path did not load")

        def predict(image_path):
            return model.pneumonia_probability([load_xray(image_path, draft_size=model.spec.size)])
    load_seconds = time.perf_counter() - start
    after_load = status_mib("VmRSS")
    for i in range(PREDICTIONS):
        predict(images[i % len(images)])
    return {"after_imports_mib": after_imports, "after_load_mib": after_load, "after_predictions_mib": status_mib("VmRSS"),
            "peak_mib": status_mib("VmHWM"), "load_s": load_seconds,
            "backend": "transformers pipeline" if path == PIPELINE else model.backend.name}


def run_case(folder: Path, path: str, images: list[str], cache: str) -> dict:
    command = [sys.executable, "-m", "benchmarks.memory", "--child", str(folder), path, "--cache", cache, "--images", *images]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{path} on {folder} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = options(__doc__, "model", "data_dir")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--images", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args.images, args.cache)))
        return 0

    images = [str(path) for path, _ in spread(labelled_files(args.data_dir / "test"), PREDICTIONS)]
    data, rows = {"predictions": PREDICTIONS, "models": {}}, []
    with tempfile.TemporaryDirectory(prefix="memory-cache-") as cache:
        for name, folder, _ in models(args.model, vit_base=not args.quick):
            cases = data["models"][name] = {}
            for path in PATHS:  # "first start" fills the cache that "ours, fast" then finds
                cases[path] = run_case(folder, path, images, cache)
                print(f"{name}, {path}: peak {cases[path]['peak_mib']:.0f} MiB", flush=True)
            rows += [[name, path, r["after_imports_mib"], r["after_load_mib"], r["peak_mib"],
                      f"{r['peak_mib'] / cases[PIPELINE]['peak_mib']:.2f}x", r["load_s"]] for path, r in cases.items()]
    markdown = section(f"Resident memory of a serving process (MiB; load + {PREDICTIONS} predictions, one image at a time)",
                       ["model", "path", "RSS after imports", "RSS after load", "peak RSS", "peak vs pipeline", "load s"], rows)
    write_results("memory", args.quick, data, markdown, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
