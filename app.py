"""Gradio app: pediatric pneumonia on chest X-rays with a small ViT (research demo).

    python app.py                                  # http://127.0.0.1:7860, bundled model
    MODEL_ID=you/pneumonia-vit python app.py       # a Hub model (or a local folder)
    GRADIO_SERVER_NAME=0.0.0.0 GRADIO_SERVER_PORT=8080 python app.py

The model is loaded once, at start-up. The page and the API are built in pneumonia_vit/webapp.py.
"""

import logging
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from pneumonia_vit.serving import Service, model_id_from_env  # noqa: E402
from pneumonia_vit.webapp import build_demo, launch  # noqa: E402

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own start-up requests
service = Service.load(model_id_from_env())
demo = build_demo(service)

if __name__ == "__main__":
    launch(demo)
