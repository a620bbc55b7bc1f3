"""Gradio app: pediatric pneumonia on chest X-rays with a small ViT (research demo).

    python app.py                                  # http://127.0.0.1:7860, bundled model
    MODEL_ID=you/pneumonia-vit python app.py       # a Hub model (or a local folder)
    GRADIO_SERVER_NAME=0.0.0.0 GRADIO_SERVER_PORT=8080 python app.py
    PNEUMONIA_VIT_FAST=0 python app.py             # fp32 PyTorch for everything (no fast path)
    PNEUMONIA_VIT_BATCH=0 python app.py            # score each API request on its own (no batching)
    PNEUMONIA_VIT_QUEUE=256 python app.py          # let 256 requests wait (default 128), then "busy"

Models, each loaded once, at start-up:
- the scoring model, for every endpoint and the page alike (/predict, /predict_batch, /assess, /analyze):
  the fast path, the model exported to ONNX with int8 weights, run by ONNX Runtime
  (pneumonia_vit/inference/fast_path.py; exported into ~/.cache/pneumonia-vit or $PNEUMONIA_VIT_CACHE on
  the first start, a few seconds; its threads: $PNEUMONIA_VIT_THREADS, default every usable core).
  Its probabilities differ from the fp32 model's by ~1e-3;
- the fp32 PyTorch model with eager attention, whose attention weights the page's heatmap is made
  of (about 3 s and 150 MB, mostly importing transformers' model code).
Every answer is taken at the threshold stored with the model, and none outside the model's domain.
PNEUMONIA_VIT_FAST=0 turns the fast path off: the fp32 PyTorch model, loaded once, then scores too;
predict.py reads the same switch. Where onnxruntime is missing or the export fails, the app logs a
warning and serves fp32 PyTorch. A check that cannot run for the served model (no kind model, no
feature statistics) is logged at start and named on the page.

Batching: concurrent /predict requests are handed to one scoring thread together, up to 8 at a time
and 2 threads (PNEUMONIA_VIT_BATCH=N sets the most at a time, 0 turns batching off); each image still
gets a forward of its own, so that its answer never depends on its companions
(pneumonia_vit/serving/service.py). Each request decodes and checks its own file first, so an
unreadable upload is an error for its sender only. benchmarks/api_throughput.py measures the
settings against each other, and /predict_batch against one-file calls.

The page and the API are built in pneumonia_vit/serving/webapp.py.
"""

import logging
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# Gradio 6 rebuilds a pandas summary of up to 10,000 past events after every event, for its
# monitoring dashboard, which this app does not enable: 3-8 ms of CPU per API request on 2 cores.
os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", "1000")
# ... and keeps those events (10,000 by default, ~1 KB each) for the dashboard alone: a memory that grows with
# the first 10,000 requests.
os.environ.setdefault("GRADIO_ANALYTICS_MAX_EVENTS", "100")

from pneumonia_vit.serving.service import Service  # noqa: E402
from pneumonia_vit.serving.webapp import build_demo, launch  # noqa: E402
from pneumonia_vit.settings import ServingSettings  # noqa: E402

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own start-up requests
settings = ServingSettings.from_environment(os.environ)
service = Service.load(settings.model_id, explain=True, max_batch=settings.max_batch, **settings.fast_path())
logging.getLogger("pneumonia_vit.app").info(
    "serving %s: /predict with %s%s, heatmaps with torch-fp32 (eager attention)", service.model_id, service.backend,
    f", up to {service.max_batch} requests per forward" if service.batcher is not None else ", unbatched")
demo = build_demo(service, max_waiting=settings.max_waiting)

if __name__ == "__main__":
    launch(demo)
