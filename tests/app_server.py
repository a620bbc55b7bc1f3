"""Starting the real app (`python app.py`) for the API and browser tests.

`served_model_dir`: the bundled model when it exists, else the `tiny_model_dir` fixture (a random
64 px ViT saved like a trained one), so the app tests always run.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUNDLED_MODEL = REPO / "models" / "pneumonia-vit-tiny"


@pytest.fixture(scope="module")
def served_model_dir(request) -> Path:
    if (BUNDLED_MODEL / "config.json").is_file():
        return BUNDLED_MODEL
    return request.getfixturevalue("tiny_model_dir")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running_app(model_dir: Path, log_path: Path, timeout: float = 120.0, env: dict | None = None):
    """`python app.py` on a free port with MODEL_ID=model_dir (and `env` on top of this process's
    environment); yields its URL, stops it after."""
    port = free_port()
    env = {
        **os.environ, "MODEL_ID": str(model_dir), "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
        "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1", **(env or {}),
    }
    url = f"http://127.0.0.1:{port}/"
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"app.py exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
                try:
                    with urllib.request.urlopen(url + "gradio_api/info", timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"app.py did not answer within {timeout:.0f} s:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
