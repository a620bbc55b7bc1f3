"""predict.py: the CSV it writes, on the fast path and in fp32, and its command line."""

from __future__ import annotations

import csv
import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pneumonia_vit.images import load_xray
from pneumonia_vit.inference.classifier import Classifier
from tests.odd_files import make_odd_files

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "normal_1.jpeg"
EXAMPLES = sorted(path for path in (REPO / "examples").glob("*.jpeg") if not path.name.startswith("adult_"))  # pediatric
ADULT_EXAMPLE = REPO / "examples" / "adult_1.jpeg"


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


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    return make_odd_files(tmp_path_factory.mktemp("odd"), EXAMPLES[0])


def expected(classifier: Classifier, path: Path) -> tuple[float, str]:
    p = float(classifier.pneumonia_probability([load_xray(path)])[0])
    return p, "PNEUMONIA" if p >= classifier.threshold else "NORMAL"


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "PNEUMONIA_VIT_FAST=0"])
def test_predict_cli_writes_a_correct_csv(served_model_dir, classifier, exact, odd, tmp_path, fast):
    folder = tmp_path / "batch"
    folder.mkdir()
    for path in [*EXAMPLES, ADULT_EXAMPLE]:
        shutil.copy(path, folder / path.name)
    for name in ("text_named.jpg", "empty.png", "valid16.dcm"):
        shutil.copy(odd[name].path, folder / name)
    output = tmp_path / "predictions.csv"
    result = subprocess.run(
        [sys.executable, "predict.py", str(folder), "--output", str(output), "--model", str(served_model_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=180, env={**os.environ, "PNEUMONIA_VIT_FAST": "1" if fast else "0"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with output.open(newline="") as handle:
        rows = {row["file"]: row for row in csv.DictReader(handle)}
    assert list(next(iter(rows.values())).keys()) == ["file", "p_normal", "p_pneumonia", "decision", "out_of_domain", "error"]
    assert set(rows) == {path.name for path in folder.iterdir()}
    model = classifier if fast else exact
    for path in [*EXAMPLES, ADULT_EXAMPLE, folder / "valid16.dcm"]:
        row = rows[path.name]
        p, decision = expected(model, path)
        assert float(row["p_pneumonia"]) == pytest.approx(p, abs=1e-4), path.name
        assert float(row["p_normal"]) == pytest.approx(1 - p, abs=1e-4)
        assert row["decision"] == ("" if path == ADULT_EXAMPLE else decision) and row["error"] == "", path.name
    assert "not a readable image" in rows["text_named.jpg"]["error"] and rows["text_named.jpg"]["p_pneumonia"] == ""
    assert "empty" in rows["empty.png"]["error"]
    assert "adult chest X-ray" in rows[ADULT_EXAMPLE.name]["out_of_domain"], "no decision, and the CSV says why"
    assert "8 of 10 files predicted (2 unreadable" in result.stderr
