"""Peak resident memory of the running app (`python app.py`, Gradio included) serving the bundled
model and ViT-B/16 (--quick: the bundled model only), with the fast path (the default) and without
it (the baseline).

Each case starts the real app on a free port (benchmarks/api_throughput.py's `running`), sends
20 /predict and 5 /analyze requests (the page's endpoint, with the heatmap) through gradio_client
with the shipped examples of children (api_throughput.EXAMPLES), then reads the server process's
VmRSS and peak VmHWM from /proc.
Baseline: PNEUMONIA_VIT_FAST=0 PNEUMONIA_VIT_BATCH=0 (one fp32 PyTorch model serves everything).
Fast: the defaults (int8 ONNX Runtime for /predict, fp32 PyTorch for the heatmap, both loaded at
start-up); its ONNX cache is filled before the app starts, as on every start after the first.
"""

from __future__ import annotations

import sys
from pathlib import Path

from benchmarks.api_throughput import EXAMPLES, App, running
from benchmarks.harness import SCRATCH, models, options, section, status_mib, write_results

CONFIGS = {
    "baseline (fp32 PyTorch, unbatched)": {"PNEUMONIA_VIT_FAST": "0", "PNEUMONIA_VIT_BATCH": "0"},
    "fast (default)": {},
}


def measure(model: Path, name: str, env: dict) -> dict:
    from gradio_client import Client, handle_file

    if not env:  # fill the fast path's cache, so the app starts as it does every time but the first
        from pneumonia_vit.inference.classifier import Classifier

        Classifier.load(str(model))
    app = App(name=name, env=env)
    with running(app, str(model), SCRATCH, timeout=300):
        started = round(status_mib("VmRSS", app.server.process.pid), 1)
        client = Client(app.url, verbose=False, ssl_verify=False)
        for endpoint, count in (("/predict", 20), ("/analyze", 5)):
            for index in range(count):
                client.predict(handle_file(str(EXAMPLES[index % len(EXAMPLES)])), api_name=endpoint)
        return {"after_start_mib": started, "after_requests_mib": round(status_mib("VmRSS", app.server.process.pid), 1),
                "peak_mib": round(status_mib("VmHWM", app.server.process.pid), 1), "startup_s": round(app.startup_s, 1)}


def main(argv=None) -> int:
    args = options(__doc__, "model").parse_args(argv)
    rows, data = [], {}
    for model_name, folder, _ in models(args.model, vit_base=not args.quick):
        for config_name, env in CONFIGS.items():
            result = data[f"{model_name} | {config_name}"] = measure(folder, config_name, env)
            baseline = data[f"{model_name} | {next(iter(CONFIGS))}"]["peak_mib"]
            rows.append([model_name, config_name, result["after_start_mib"], result["after_requests_mib"],
                         result["peak_mib"], f"{result['peak_mib'] / baseline:.2f}x", result["startup_s"]])
            print(model_name, config_name, result, flush=True)
    markdown = section("Resident memory of the app process (MiB; `python app.py`, 20 /predict + 5 /analyze)",
                       ["model", "app", "RSS after start", "RSS after requests", "peak RSS", "peak vs baseline",
                        "start-up s"], rows)
    write_results("app_memory", args.quick, data, markdown, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
