"""The real app (`python app.py` in a subprocess) called through gradio_client, and predict.py."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumonia_vit.images import load_xray
from pneumonia_vit.model import Classifier
from tests.app_server import REPO, running_app, served_model_dir  # noqa: F401  (fixture)
from tests.odd_files import BAD, READABLE, make_odd_files

EXAMPLES = sorted((REPO / "examples").glob("*.jpeg"))


@pytest.fixture(scope="module")
def app_url(served_model_dir, tmp_path_factory):
    with running_app(served_model_dir, tmp_path_factory.mktemp("app") / "app.log") as url:
        yield url


@pytest.fixture(scope="module")
def client(app_url):
    from gradio_client import Client

    return Client(app_url, verbose=False)


@pytest.fixture(scope="module")
def classifier(served_model_dir) -> Classifier:
    """The app serves the fp32 PyTorch model (serving.Service.load); compare with the same."""
    return Classifier.load(str(served_model_dir), fast=False)


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    return make_odd_files(tmp_path_factory.mktemp("odd"), EXAMPLES[0])


def confidences(value: dict) -> dict[str, float]:
    return {item["label"]: item["confidence"] for item in value["confidences"]}


def expected(classifier: Classifier, path: Path) -> tuple[float, str]:
    p = float(classifier.pneumonia_probability([load_xray(path)])[0])
    return p, "PNEUMONIA" if p >= classifier.threshold else "NORMAL"


def call(client, path: Path, endpoint: str = "/predict"):
    from gradio_client import handle_file

    return client.predict(handle_file(str(path)), api_name=endpoint)


def test_examples_shipped_with_credit():
    assert len(EXAMPLES) == 6
    assert sum(path.name.startswith("normal") for path in EXAMPLES) == 3
    credit = (REPO / "examples" / "README.md").read_text()
    assert "Kermany" in credit and "CC BY 4.0" in credit
    for path in EXAMPLES:
        assert path.stat().st_size < 100_000 and max(Image.open(path).size) == 512


def test_predict_equals_the_classifier_on_every_example(client, classifier):
    for path in EXAMPLES:
        value = call(client, path)
        p, decision = expected(classifier, path)
        scores = confidences(value)
        assert set(scores) == {"NORMAL", "PNEUMONIA"}
        assert scores["PNEUMONIA"] == pytest.approx(p, abs=1e-4), path.name
        assert scores["NORMAL"] == pytest.approx(1 - p, abs=1e-4), path.name
        assert value["label"] == decision, "the label is the decision at the stored threshold"


def test_analyze_returns_preview_decision_note_and_heatmap(client, classifier):
    preview, value, markdown, heatmap = call(client, EXAMPLES[-1], "/analyze")
    p, decision = expected(classifier, EXAMPLES[-1])
    assert confidences(value)["PNEUMONIA"] == pytest.approx(p, abs=1e-4)
    assert f"Decision: {decision}" in markdown and f"{classifier.threshold:.3f}" in markdown
    assert "passed the" in markdown, "an example X-ray is in domain"
    for image_path in (preview, heatmap):
        image = Image.open(image_path)
        assert max(image.size) == 512
    assert Image.open(heatmap).mode == "RGB"


def test_colour_photo_is_flagged_out_of_domain(client, tmp_path):
    rgb = np.asarray(Image.open(EXAMPLES[0]).convert("RGB")).copy()
    rgb[..., 0] = np.clip(rgb[..., 0].astype(int) + 80, 0, 255)  # a strong red cast
    Image.fromarray(rgb).save(tmp_path / "tinted.jpg")
    markdown = call(client, tmp_path / "tinted.jpg", "/analyze")[2]
    assert "Out of domain" in markdown and "colour" in markdown
    Image.new("L", (400, 400), 200).save(tmp_path / "blank.png")
    assert "blank" in call(client, tmp_path / "blank.png", "/analyze")[2]


@pytest.mark.parametrize("name", BAD)
def test_bad_input_is_an_error_and_the_server_keeps_serving(client, classifier, odd, name):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as caught:
        call(client, odd[name].path)
    assert odd[name].error in str(caught.value)
    assert str(odd[name].path.parent) not in str(caught.value), "no server paths in messages"
    value = call(client, EXAMPLES[1])
    assert confidences(value)["PNEUMONIA"] == pytest.approx(expected(classifier, EXAMPLES[1])[0], abs=1e-4)


@pytest.mark.parametrize("name", READABLE)
def test_odd_but_valid_input_is_predicted(client, classifier, odd, name):
    value = call(client, odd[name].path)
    assert confidences(value)["PNEUMONIA"] == pytest.approx(expected(classifier, odd[name].path)[0], abs=1e-4)


def test_dicom_gets_the_prediction_of_the_image_it_holds(client, odd):
    # valid16.dcm and monochrome1.dcm hold normal_1.jpeg (as 16-bit, and inverted as MONOCHROME1).
    reference = confidences(call(client, EXAMPLES[0]))["PNEUMONIA"]
    for name in ("valid16.dcm", "monochrome1.dcm"):
        assert confidences(call(client, odd[name].path))["PNEUMONIA"] == pytest.approx(reference, abs=0.02), name


def test_four_concurrent_clients(app_url, classifier):
    from gradio_client import Client

    paths = EXAMPLES[:4]

    def one(path: Path) -> float:
        return confidences(call(Client(app_url, verbose=False), path))["PNEUMONIA"]

    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(one, paths))
    for path, answer in zip(paths, answers):
        assert answer == pytest.approx(expected(classifier, path)[0], abs=1e-4)


def test_upload_size_cap(client, app_url, tmp_path):
    big = tmp_path / "huge.png"
    big.write_bytes(b"\x89PNG" + b"\x00" * (26 * 1024 * 1024))  # over the 25 MB cap
    with pytest.raises(Exception) as caught:
        call(client, big)
    assert "413" in str(caught.value) or "size" in str(caught.value).lower()
    assert "label" in call(client, EXAMPLES[2])


def test_only_examples_are_served_from_disk(app_url):
    def status(path: Path) -> int:
        try:
            with urllib.request.urlopen(f"{app_url}gradio_api/file={path}", timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    assert status(REPO / "app.py") == 403
    assert status(REPO / "pneumonia_vit" / "serving.py") == 403
    assert status(Path("/etc/passwd")) == 403
    assert status(EXAMPLES[0]) == 200


def test_api_lists_predict_and_analyze(client):
    info = client.view_api(print_info=False, return_format="dict")
    assert {"/predict", "/analyze"} <= set(info["named_endpoints"])


def test_predict_cli_writes_a_correct_csv(served_model_dir, classifier, odd, tmp_path):
    folder = tmp_path / "batch"
    folder.mkdir()
    for path in EXAMPLES:
        shutil.copy(path, folder / path.name)
    for name in ("text_named.jpg", "empty.png", "valid16.dcm"):
        shutil.copy(odd[name].path, folder / name)
    output = tmp_path / "predictions.csv"
    result = subprocess.run(
        [sys.executable, "predict.py", str(folder), "--output", str(output), "--model", str(served_model_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with output.open(newline="") as handle:
        rows = {row["file"]: row for row in csv.DictReader(handle)}
    assert list(next(iter(rows.values())).keys()) == ["file", "p_normal", "p_pneumonia", "decision", "out_of_domain", "error"]
    assert set(rows) == {path.name for path in folder.iterdir()}
    for path in EXAMPLES + [folder / "valid16.dcm"]:
        row = rows[path.name]
        p, decision = expected(classifier, path)
        assert float(row["p_pneumonia"]) == pytest.approx(p, abs=1e-4)
        assert float(row["p_normal"]) == pytest.approx(1 - p, abs=1e-4)
        assert row["decision"] == decision and row["error"] == ""
    assert "not a readable image" in rows["text_named.jpg"]["error"] and rows["text_named.jpg"]["p_pneumonia"] == ""
    assert "empty" in rows["empty.png"]["error"]
    assert "7 of 9 files predicted (2 unreadable" in result.stderr
