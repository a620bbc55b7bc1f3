"""Peak resident memory (RSS) of a process that serves a model: the plain fp32
`transformers.pipeline` against this project's paths, for the bundled model and ViT-B/16.

    python -m benchmarks.memory            # full run, about 3 minutes on 2 cores
    python -m benchmarks.memory --quick    # smoke run: the bundled model only

Each case runs in a fresh subprocess (`python -m benchmarks.memory --child MODEL PATH`): import,
load the model, score 20 real X-rays one at a time, then report its RSS after the imports, after
loading, and the peak (VmHWM, i.e. ru_maxrss). Paths:
- pipeline fp32: `pipeline("image-classification", model=folder)(Image.open(path))`;
- ours, torch fp32: `Classifier.load(folder, fast=False)`, `load_xray(path, draft_size)`;
- ours, fast, first start: `Classifier.load(folder)` with an empty cache (includes the one-off
  ONNX export and quantization, which needs the PyTorch model in memory);
- ours, fast: the same with the cache filled, as every later start of a server.
The cache is a temporary folder of this run, not ~/.cache/pneumonia-vit.
Results: benchmarks/results/memory.{json,md} (memory-quick.* with --quick).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PATHS = ("pipeline fp32", "ours, torch fp32", "ours, fast, first start", "ours, fast")
PREDICTIONS = 20


def status_mib(field: str, pid: int | str = "self") -> float | None:
    """A memory field of /proc/<pid>/status (VmRSS: resident now, VmHWM: peak) in MiB; None off Linux."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mib() -> float:
    value = status_mib("VmRSS")
    if value is None:
        import psutil

        value = psutil.Process().memory_info().rss / 2**20
    return value


def peak_mib() -> float:
    value = status_mib("VmHWM")
    if value is None:  # ru_maxrss: kilobytes on Linux, bytes on macOS
        value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)
    return value


def child(folder: str, path: str, images: list[str], cache: str) -> dict:
    """One case, in this (fresh) process."""
    from PIL import Image

    import benchmarks._common  # noqa: F401  (offline settings, quiet transformers)
    from pneumonia_vit.images import load_xray
    from pneumonia_vit.inference.classifier import Classifier

    if path == PATHS[0]:
        from transformers import pipeline
    after_imports = rss_mib()
    start = time.perf_counter()
    if path == PATHS[0]:
        model = pipeline("image-classification", model=folder, device="cpu")

        def predict(image_path):
            return model(Image.open(image_path), top_k=2)
    else:
        model = Classifier.load(folder, fast=path != PATHS[1], cache=cache)
        if path != PATHS[1] and model.backend.name != "onnxruntime-int8":
            raise SystemExit("the fast path did not load")

        def predict(image_path):
            return model.pneumonia_probability([load_xray(image_path, draft_size=model.spec.size)])
    load_seconds = time.perf_counter() - start
    after_load = rss_mib()
    for i in range(PREDICTIONS):
        predict(images[i % len(images)])
    return {"after_imports_mib": after_imports, "after_load_mib": after_load, "after_predictions_mib": rss_mib(),
            "peak_mib": peak_mib(), "load_s": load_seconds,
            "backend": "transformers pipeline" if path == PATHS[0] else model.backend.name}


def run_case(folder: Path, path: str, images: list[str], cache: Path) -> dict:
    command = [sys.executable, "-m", "benchmarks.memory", "--child", str(folder), path, "--cache", str(cache),
               "--images", *images]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{path} on {folder} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--bundled", default=None)
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--images", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args.images, args.cache)))
        return 0

    from benchmarks._common import (
        PREPARED_TEST,
        bundled_dir,
        labelled_files,
        markdown_table,
        spread,
        vit_base_dir,
        write_results,
    )

    images = [str(path) for path, _ in spread(labelled_files(PREPARED_TEST), PREDICTIONS)]
    bundled, trained = bundled_dir(args.bundled)
    models = [("bundled" + ("" if trained else " (random weights)"), bundled)]
    if not args.quick:
        models.append(("ViT-B/16 (random weights)", vit_base_dir()))
    data, rows = {"predictions": PREDICTIONS, "models": {}}, []
    with tempfile.TemporaryDirectory(prefix="memory-cache-") as cache:
        for name, folder in models:
            data["models"][name] = {}
            for path in PATHS:  # "first start" fills the cache that "ours, fast" then finds
                result = run_case(folder, path, images, Path(cache))
                data["models"][name][path] = result
                print(f"{name}, {path}: peak {result['peak_mib']:.0f} MiB", flush=True)
            base = data["models"][name][PATHS[0]]["peak_mib"]
            for path in PATHS:
                r = data["models"][name][path]
                rows.append([name, path, r["after_imports_mib"], r["after_load_mib"], r["peak_mib"],
                             f"{r['peak_mib'] / base:.2f}x", r["load_s"]])
    markdown = (f"### Resident memory of a serving process (MiB; load + {PREDICTIONS} predictions, one image at a time)\n\n"
                + markdown_table(["model", "path", "RSS after imports", "RSS after load", "peak RSS", "peak vs pipeline",
                                  "load s"], rows))
    write_results("memory", args.quick, data, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
