"""Peak resident memory of the running app (`python app.py`, Gradio included) serving the bundled
model and ViT-B/16, with the fast path (the default) and without it (the baseline).

    python -m benchmarks.app_memory            # about 2 minutes on 2 cores
    python -m benchmarks.app_memory --quick    # the bundled model only

Each case starts the real app on a free port (benchmarks/api_throughput.py's `running`), sends
20 /predict and 5 /analyze requests (the page's endpoint, with the heatmap) through gradio_client
with the shipped examples, then reads the server process's VmRSS and peak VmHWM from /proc.
Baseline: PNEUMONIA_VIT_FAST=0 PNEUMONIA_VIT_BATCH=0 (one fp32 PyTorch model serves everything).
Fast: the defaults (int8 ONNX Runtime for /predict, fp32 PyTorch for the heatmap, both loaded at
start-up); its ONNX cache is filled before the app starts, as on every start after the first.
Results: benchmarks/results/app_memory.{json,md} (app_memory-quick.* with --quick).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from benchmarks._common import SCRATCH, bundled_dir, markdown_table, vit_base_dir, write_results
from benchmarks.api_throughput import EXAMPLES, App, running
from benchmarks.memory import status_mib

CONFIGS = {
    "baseline (fp32 PyTorch, unbatched)": {"PNEUMONIA_VIT_FAST": "0", "PNEUMONIA_VIT_BATCH": "0"},
    "fast (default)": {},
}


def process_mib(pid: int) -> dict:
    return {"rss_mib": round(status_mib("VmRSS", pid), 1), "peak_mib": round(status_mib("VmHWM", pid), 1)}


def measure(model: Path, name: str, env: dict) -> dict:
    from gradio_client import Client, handle_file

    if not env:  # fill the fast path's cache, so the app starts as it does every time but the first
        from pneumonia_vit.inference.classifier import Classifier

        Classifier.load(str(model))
    app = App(name=name, env=env)
    with running(app, str(model), SCRATCH, timeout=300):
        started = process_mib(app.server.process.pid)
        client = Client(app.url, verbose=False, ssl_verify=False)
        for index in range(20):
            client.predict(handle_file(str(EXAMPLES[index % len(EXAMPLES)])), api_name="/predict")
        for index in range(5):
            client.predict(handle_file(str(EXAMPLES[index % len(EXAMPLES)])), api_name="/analyze")
        after = process_mib(app.server.process.pid)
    return {"after_start_mib": started["rss_mib"], "after_requests_mib": after["rss_mib"],
            "peak_mib": after["peak_mib"], "startup_s": round(app.startup_s, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the bundled model only")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    models = {"bundled": bundled_dir()[0]}
    if not args.quick:
        models["ViT-B/16 (random weights)"] = vit_base_dir()
    rows, data = [], {}
    for model_name, folder in models.items():
        baseline = None
        for config_name, env in CONFIGS.items():
            result = measure(folder, config_name, env)
            baseline = baseline or result["peak_mib"]
            data[f"{model_name} | {config_name}"] = result
            rows.append([model_name, config_name, result["after_start_mib"], result["after_requests_mib"],
                         result["peak_mib"], f"{result['peak_mib'] / baseline:.2f}x", result["startup_s"]])
            print(model_name, config_name, result, flush=True)
    markdown = "### Resident memory of the app process (MiB; `python app.py`, 20 /predict + 5 /analyze)\n\n" + markdown_table(
        ["model", "app", "RSS after start", "RSS after requests", "peak RSS", "peak vs baseline", "start-up s"], rows)
    write_results("app_memory", args.quick, data, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
