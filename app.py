"""Gradio app: pediatric pneumonia on chest X-rays with a small ViT (research demo). Loads the model
(pneumonia_vit/serving/service.py), builds the page and API (serving/webapp.py) and launches them.

    python app.py                                  # http://127.0.0.1:7860, bundled model
    MODEL_ID=you/pneumonia-vit python app.py       # a Hub model (or a local folder)
    GRADIO_SERVER_NAME=0.0.0.0 GRADIO_SERVER_PORT=8080 python app.py
Other settings (fast path, its cache and threads, queue length): pneumonia_vit/settings.py.
"""

import logging
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# gradio's monitoring dashboard, which this app does not enable, would otherwise rebuild a summary of up to
# 10,000 past events after every event (CPU per request) and keep them (memory growing with the first requests).
os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", "1000")
os.environ.setdefault("GRADIO_ANALYTICS_MAX_EVENTS", "100")

from pneumonia_vit.serving.service import Service  # noqa: E402
from pneumonia_vit.serving.webapp import build_demo, launch  # noqa: E402
from pneumonia_vit.settings import ServingSettings  # noqa: E402

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own start-up requests
settings = ServingSettings.from_environment(os.environ)
service = Service.load(settings.model_id, explain=True, **settings.fast_path())
logging.getLogger("pneumonia_vit.app").info("serving %s: /predict with %s, heatmaps with torch-fp32 (eager attention)",
                                            service.model_id, service.backend)
demo = build_demo(service, max_waiting=settings.max_waiting)

if __name__ == "__main__":
    launch(demo)
