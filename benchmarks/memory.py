"""Resident memory (RSS, peak VmHWM) of a process that serves a model, for the bundled model and ViT-B/16 (--quick:
the bundled model only).

    python -m benchmarks.memory         # one fresh process per path: imports, load, 20 predictions one at a time
    python -m benchmarks.memory --app   # the app itself (`python app.py`): 20 /predict + 5 /analyze

Paths: the plain fp32 `transformers.pipeline`; ours in fp32 (`Classifier.load(folder, fast=False)`); ours fast with
an empty cache (the one-off ONNX export and quantization, which holds the PyTorch model too) and with it filled, as
every later start. The cache is a temporary folder, not ~/.cache/pneumonia-vit. Apps: PNEUMONIA_VIT_FAST=0
(one fp32 model serves everything) and the defaults (int8 for /predict, fp32 for the heatmap),
their cache filled before the start.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import (
    EXAMPLES,
    SCRATCH,
    client,
    labelled_files,
    models,
    options,
    section,
    spread,
    status_mib,
    write_results,
)

PIPELINE, TORCH = "pipeline fp32", "ours, torch fp32"
PATHS = (PIPELINE, TORCH, "ours, fast, first start", "ours, fast")
APPS = {"baseline (fp32 PyTorch)": {"PNEUMONIA_VIT_FAST": "0"},
        "fast (default)": {}}
PREDICTIONS = 20


def child(folder: str, path: str, images: list[str], cache: str) -> dict:
    """One path, in this (fresh) process."""
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
    return {"after_imports_mib": after_imports, "after_load_mib": after_load,
            "after_predictions_mib": status_mib("VmRSS"), "peak_mib": status_mib("VmHWM"), "load_s": load_seconds,
            "backend": "transformers pipeline" if path == PIPELINE else model.backend.name}


def run_case(folder: Path, path: str, images: list[str], cache: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--child", str(folder), path, "--cache", cache,
                             "--images", *images], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{path} on {folder} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def app_case(model: Path, name: str, env: dict) -> dict:
    from gradio_client import handle_file

    from tests.app_server import running_app

    if not env:  # the defaults' fast path: its cache filled, as on every start but the first
        from pneumonia_vit.inference.classifier import Classifier

        Classifier.load(str(model))
    with running_app(model, SCRATCH / f"app_memory_{name.split()[0]}.log", timeout=300, env=env) as app:
        started = round(status_mib("VmRSS", app.process.pid), 1)
        app_client = client(app.url)
        for endpoint, count in (("/predict", 20), ("/analyze", 5)):
            for index in range(count):
                app_client.predict(handle_file(str(EXAMPLES[index % len(EXAMPLES)])), api_name=endpoint)
        return {"after_start_mib": started, "after_requests_mib": round(status_mib("VmRSS", app.process.pid), 1),
                "peak_mib": round(status_mib("VmHWM", app.process.pid), 1), "startup_s": round(app.startup_s, 1)}


def measure_apps(args) -> None:
    rows, data = [], {}
    for model_name, folder in models(args.model, vit_base=not args.quick):
        for name, env in APPS.items():
            result = data[f"{model_name} | {name}"] = app_case(folder, name, env)
            baseline = data[f"{model_name} | {next(iter(APPS))}"]["peak_mib"]
            rows.append([model_name, name, result["after_start_mib"], result["after_requests_mib"], result["peak_mib"],
                         f"{result['peak_mib'] / baseline:.2f}x", result["startup_s"]])
            print(model_name, name, result, flush=True)
    write_results("app_memory", args, data, [section(
        "Resident memory of the app process (MiB; `python app.py`, 20 /predict + 5 /analyze)",
        ["model", "app", "RSS after start", "RSS after requests", "peak RSS", "peak vs baseline", "start-up s"], rows)])


def main(argv=None) -> int:
    parser = options(__doc__, "model", "data_dir")
    parser.add_argument("--app", action="store_true", help="measure `python app.py` (results: app_memory.*)")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--images", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args.images, args.cache)))
        return 0
    if args.app:
        measure_apps(args)
        return 0
    images = [str(path) for path, _ in spread(labelled_files(args.data_dir / "test"), PREDICTIONS)]
    data, rows = {"predictions": PREDICTIONS, "models": {}}, []
    with tempfile.TemporaryDirectory(prefix="memory-cache-") as cache:
        for name, folder in models(args.model, vit_base=not args.quick):
            cases = data["models"][name] = {}
            for path in PATHS:  # "first start" fills the cache that "ours, fast" then finds
                cases[path] = run_case(folder, path, images, cache)
                print(f"{name}, {path}: peak {cases[path]['peak_mib']:.0f} MiB", flush=True)
            rows += [[name, path, r["after_imports_mib"], r["after_load_mib"], r["peak_mib"],
                      f"{r['peak_mib'] / cases[PIPELINE]['peak_mib']:.2f}x", r["load_s"]] for path, r in cases.items()]
    write_results("memory", args, data, [section(
        f"Resident memory of a serving process (MiB; load + {PREDICTIONS} predictions, one image at a time)",
        ["model", "path", "RSS after imports", "RSS after load", "peak RSS", "peak vs pipeline", "load s"], rows)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
