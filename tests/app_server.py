"""Starting the real app (`python app.py`) on a free port: for the API and browser tests, and for the
benchmarks that measure the running app (benchmarks/api_throughput.py, crowd.py, memory.py --app).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass
class RunningApp:
    url: str
    process: subprocess.Popen
    log_path: Path
    startup_s: float  # from starting the process to the first answer of /gradio_api/info

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running_app(model_dir: str | Path, log_path: Path, timeout: float = 120.0,
                env: dict | None = None) -> Iterator[RunningApp]:
    """`python app.py` on a free port with MODEL_ID=model_dir (and `env` on top of this process's
    environment), its output in `log_path`; yields once it answers, stops it after."""
    port = free_port()
    env = {
        **os.environ, "MODEL_ID": str(model_dir), "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
        "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1", **(env or {}),
    }
    url = f"http://127.0.0.1:{port}/"
    started = time.perf_counter()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"app.py exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
                try:
                    with urllib.request.urlopen(url + "gradio_api/info", timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if time.perf_counter() - started > timeout:
                    raise TimeoutError(f"app.py did not answer within {timeout:.0f} s:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.25)
            yield RunningApp(url, process, log_path, time.perf_counter() - started)
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
