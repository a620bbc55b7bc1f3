"""predict.py's command line around the scoring (tests/test_app_api.py checks the CSV it writes)."""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "normal_1.jpeg"


def run_predict(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "predict.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=180, env=env)


def test_folder_with_only_sub_folders_suggests_recursive(tmp_path):
    (tmp_path / "NORMAL").mkdir()
    shutil.copy(EXAMPLE, tmp_path / "NORMAL" / EXAMPLE.name)
    result = run_predict(str(tmp_path))
    assert result.returncode == 2
    assert "holds only sub-folders: add --recursive" in result.stderr
    assert not (tmp_path / "predictions.csv").exists()


class _RecordingHub(http.server.BaseHTTPRequestHandler):
    """Answers every request with 404 and remembers its path."""

    paths: list[str] = []

    def do_GET(self):
        self.paths.append(self.path)
        self.send_error(404)

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


def test_a_hub_model_id_is_looked_up_on_the_hub(tmp_path):
    # predict.py used to force HF_HUB_OFFLINE=1, so a Hub id could never load: now only a local
    # model keeps predict.py offline. The Hub here is a local stand-in that knows no model.
    shutil.copy(EXAMPLE, tmp_path / EXAMPLE.name)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RecordingHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}", HF_HOME=str(tmp_path / "hf_home"))
    try:
        result = run_predict(str(tmp_path), "--model", "someone/pneumonia-vit", env=env)
    finally:
        server.shutdown()
    assert result.returncode != 0
    assert any("someone/pneumonia-vit" in path for path in _RecordingHub.paths), _RecordingHub.paths
