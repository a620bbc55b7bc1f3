"""The real app (`python app.py` in a subprocess) called through gradio_client, and predict.py.

The app serves /predict on the fast path (ONNX Runtime, int8) with concurrent requests batched, and
/analyze with the fp32 PyTorch model. Tolerances: a /predict answer scored alone equals the fast
Classifier on that one image (1e-4, the rounding of the label's confidences); one that may have
shared a forward with other requests is within BATCH_TOLERANCE of it (int8 activations are scaled
per batch; tests/test_fast_path.py bounds the same effect). With PNEUMONIA_VIT_FAST=0
PNEUMONIA_VIT_BATCH=0 the app serves the fp32 model everywhere, equal to it within 1e-4.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumonia_vit.images import load_xray
from pneumonia_vit.inference.classifier import Classifier
from tests.app_server import REPO, running_app
from tests.odd_files import BAD, READABLE, make_odd_files

EXAMPLES = sorted(path for path in (REPO / "examples").glob("*.jpeg") if not path.name.startswith("adult_"))  # pediatric
ADULT_EXAMPLE = REPO / "examples" / "adult_1.jpeg"
BATCH_TOLERANCE = 0.01  # PROBABILITY_TOLERANCE / 2 of tests/test_fast_path.py; batch-mates move the bundled model by up to ~0.008
DEFAULTS = {"PNEUMONIA_VIT_FAST": "1", "PNEUMONIA_VIT_BATCH": "8"}  # the app's defaults, whatever this shell sets


@pytest.fixture(scope="module")
def app_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("app") / "app.log"


@pytest.fixture(scope="module")
def upload_cache(tmp_path_factory) -> Path:
    """The app's gradio cache (GRADIO_TEMP_DIR): uploads, and the images /analyze returns."""
    return tmp_path_factory.mktemp("gradio_cache")


@pytest.fixture(scope="module")
def app_url(served_model_dir, app_log, upload_cache):
    with running_app(served_model_dir, app_log, env={**DEFAULTS, "GRADIO_TEMP_DIR": str(upload_cache)}) as app:
        yield app.url


@pytest.fixture(scope="module")
def client(app_url):
    from gradio_client import Client

    return Client(app_url, verbose=False)


@pytest.fixture(scope="module")
def classifier(served_model_dir) -> Classifier:
    """What /predict and predict.py serve by default: the fast path (int8 ONNX Runtime)."""
    return Classifier.load(str(served_model_dir), fast=True)


@pytest.fixture(scope="module")
def exact(served_model_dir) -> Classifier:
    """What /analyze serves, and everything with PNEUMONIA_VIT_FAST=0: the fp32 PyTorch model."""
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
    assert ADULT_EXAMPLE.is_file() and "NIH" in credit and "Wang" in credit and ADULT_EXAMPLE.name in credit


def test_app_serves_predict_fast_and_batched_and_analyze_with_pytorch(client, classifier, app_log):
    assert classifier.backend.name == "onnxruntime-int8"
    assert "/predict with onnxruntime-int8, up to 8 requests per forward, /analyze with torch-fp32" in app_log.read_text()


def test_predict_equals_the_classifier_on_every_example(client, classifier):
    """One request at a time: each is scored alone, exactly as the fast Classifier scores one image."""
    for path in EXAMPLES:
        value = call(client, path)
        p, decision = expected(classifier, path)
        scores = confidences(value)
        assert set(scores) == {"NORMAL", "PNEUMONIA"}
        assert scores["PNEUMONIA"] == pytest.approx(p, abs=1e-4), path.name
        assert scores["NORMAL"] == pytest.approx(1 - p, abs=1e-4), path.name
        assert value["label"] == decision, "the label is the decision at the stored threshold"


def test_analyze_returns_preview_decision_note_and_heatmap(client, exact):
    preview, value, markdown, heatmap = call(client, EXAMPLES[-1], "/analyze")
    p, decision = expected(exact, EXAMPLES[-1])  # the page runs the fp32 model its heatmap explains
    assert confidences(value)["PNEUMONIA"] == pytest.approx(p, abs=1e-4)
    assert f"Decision: {decision}" in markdown and f"{exact.threshold:.3f}" in markdown
    assert "passed the" in markdown, "an example X-ray is in domain"
    for image_path in (preview, heatmap):
        image = Image.open(image_path)
        assert max(image.size) == 512
    assert Image.open(heatmap).mode == "RGB"


@pytest.fixture(scope="module")
def adult_xray(data_root) -> Path:
    """An adult image of the shared folder, of a patient the kind model was not fitted on."""
    from pneumonia_vit.ood.corpus import adult_files

    return adult_files(data_root / "adult_cxr_224", "held_out")[0]


def test_adult_xray_gets_the_verdict_and_the_warning(client, adult_xray):
    assessed = call(client, adult_xray, "/assess")
    assert assessed["domain"]["in_domain"] is False and assessed["domain"]["looks_like"] == "adult_chest_xray"
    assert "kind" in assessed["domain"]["rules_fired"]
    assert assessed["decision"] is None and assessed["decision_applicable"] is False
    assert assessed["probabilities_reliable"] is False and set(assessed["probabilities"]) == {"NORMAL", "PNEUMONIA"}
    assert "adult chest X-ray" in assessed["warning"] and "children aged 1-5" in assessed["warning"]
    markdown = call(client, adult_xray, "/analyze")[2]
    assert "adult chest X-ray" in markdown and "Decision: not applicable" in markdown and "unreliable" in markdown
    assert call(client, adult_xray, "/predict")["label"] in ("NORMAL", "PNEUMONIA"), "/predict answers as before"


def test_pediatric_test_image_gets_a_decision_and_no_warning(client, classifier, data_root):
    path = sorted((data_root / "chest_xray_224" / "test" / "PNEUMONIA").iterdir())[0]
    assessed = call(client, path, "/assess")
    p, decision = expected(classifier, path)
    assert assessed["domain"]["in_domain"] is True and assessed["domain"]["looks_like"] == "pediatric_chest_xray"
    assert assessed["domain"]["rules_fired"] == [] and assessed["domain"]["checks"].count("image-kind") == 1
    assert assessed["warning"] is None and assessed["decision"] == decision and assessed["decision_applicable"]
    assert assessed["probabilities"]["PNEUMONIA"] == pytest.approx(p, abs=1e-4)
    markdown = call(client, path, "/analyze")[2]
    assert "Out of domain" not in markdown and "Decision: " in markdown and "not applicable" not in markdown


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
        assert answer == pytest.approx(expected(classifier, path)[0], abs=BATCH_TOLERANCE)


def test_a_full_queue_refuses_at_once_saying_busy_and_keeps_serving(served_model_dir, tmp_path):
    """An app that lets 2 requests wait, 24 clients at once on the page's endpoint (2 at a time): those
    beyond the queue hear "busy" with the count ahead; no other error, no dropped connection; then the
    app answers the next request."""
    from gradio_client import Client
    from gradio_client.exceptions import ValidationError

    with running_app(served_model_dir, tmp_path / "app.log", env={**DEFAULTS, "PNEUMONIA_VIT_QUEUE": "2"}) as app:
        # gradio_client's own 5 s HTTP timeout would count a slow machine as a refusal.
        clients = [Client(app.url, verbose=False, httpx_kwargs={"timeout": 60}) for _ in range(24)]
        barrier = threading.Barrier(len(clients))

        def one(index: int):
            barrier.wait()
            try:
                return call(clients[index], EXAMPLES[index % len(EXAMPLES)], "/analyze")
            except Exception as error:  # noqa: BLE001 - every kind of failure is counted below
                return error

        with ThreadPoolExecutor(max_workers=len(clients)) as pool:
            answers = list(pool.map(one, range(len(clients))))
        refusals = [answer for answer in answers if isinstance(answer, Exception)]
        assert refusals, "24 clients at once on a 2-request queue: some must be refused"
        for refusal in refusals:
            assert isinstance(refusal, ValidationError), repr(refusal)
            assert re.search(r"busy: \d+ requests ahead, retry in a few seconds", str(refusal)), str(refusal)
        assert "label" in call(clients[0], EXAMPLES[0])


def batch_sizes(log: Path) -> list[int]:
    return [int(size) for size in re.findall(r"predict \S* p=.* \(batch of (\d+)\)", log.read_text())]


def test_bad_inputs_in_a_batch_fail_alone(app_url, classifier, odd, app_log):
    """Sixteen clients at once, four with unusable files: those four get their own error, the twelve
    others their prediction, while concurrent requests share forwards."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    jobs = 2 * [EXAMPLES[0], odd["text_named.jpg"].path, *EXAMPLES[1:4], odd["truncated.jpg"].path, *EXAMPLES[4:6]]
    clients = [Client(app_url, verbose=False) for _ in jobs]
    for _ in range(5):  # concurrency is up to the scheduler: retry until some requests shared a forward
        seen = len(batch_sizes(app_log))
        barrier = threading.Barrier(len(jobs))

        def one(index: int, barrier=barrier):
            barrier.wait()
            try:
                return confidences(call(clients[index], jobs[index]))["PNEUMONIA"]
            except AppError as error:
                return error

        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            answers = list(pool.map(one, range(len(jobs))))
        for path, answer in zip(jobs, answers):
            if path in EXAMPLES:
                assert not isinstance(answer, Exception), (path.name, answer)
                assert answer == pytest.approx(expected(classifier, path)[0], abs=BATCH_TOLERANCE), path.name
            else:
                assert isinstance(answer, AppError), (path.name, answer)
                assert odd[path.name].error in str(answer) and path.name in str(answer)
                assert str(path.parent) not in str(answer), "no server paths in messages"
        if max(batch_sizes(app_log)[seen:], default=1) > 1:
            break
    else:
        pytest.fail(f"no two of {len(jobs)} concurrent requests shared a forward in 5 tries: {batch_sizes(app_log)}")


def test_upload_over_the_size_limit_is_refused_naming_the_limit_in_mb(client, tmp_path):
    from gradio_client.exceptions import AppError

    big = tmp_path / "huge.png"
    big.write_bytes(b"\x89PNG" + b"\x00" * (30 * 2**20))
    with pytest.raises(AppError) as caught:
        call(client, big)
    assert str(caught.value).startswith("huge.png: the file is 30 MB; the limit is 25 MB.")
    assert "bytes" not in str(caught.value)
    assert "label" in call(client, EXAMPLES[2])


def test_expected_bad_input_is_one_log_line_not_a_traceback(client, odd, app_log):
    from gradio_client.exceptions import AppError

    before = len(app_log.read_text().splitlines())
    for name in ("report.pdf", "notes.txt"):
        for endpoint in ("/predict", "/analyze"):
            with pytest.raises(AppError, match="not a readable image. Upload a PNG, JPEG or DICOM"):
                call(client, odd[name].path, endpoint)
    new_lines = app_log.read_text().splitlines()[before:]
    assert "Traceback" not in "\n".join(new_lines)
    assert len([line for line in new_lines if "rejected upload" in line]) == 4, new_lines


def test_requests_leave_no_stray_files_in_the_upload_cache(client, upload_cache):
    """Uploads and the images /analyze returns live in folders named by their content, which gradio's
    cache clean-up deletes; nothing else may pile up (gr.File's own preprocess left an empty file at
    the top level on every request)."""
    call(client, EXAMPLES[3])
    call(client, EXAMPLES[3], "/analyze")
    assert [path.name for path in upload_cache.iterdir() if not path.is_dir()] == []


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


def test_api_lists_predict_analyze_and_assess(client):
    info = client.view_api(print_info=False, return_format="dict")
    assert {"/predict", "/analyze", "/assess"} <= set(info["named_endpoints"])


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
    # predict.py scores the readable files of a folder as one batch, in file-name order: the reference
    # is the same batch (the fast path's scores depend slightly on their batch companions).
    readable = sorted(EXAMPLES + [ADULT_EXAMPLE, folder / "valid16.dcm"], key=lambda path: path.name)
    model = classifier if fast else exact
    reference = model.pneumonia_probability([load_xray(path) for path in readable])
    for path, p in zip(readable, reference):
        row = rows[path.name]
        assert float(row["p_pneumonia"]) == pytest.approx(float(p), abs=1e-4), path.name
        assert float(row["p_normal"]) == pytest.approx(1 - float(p), abs=1e-4)
        assert row["decision"] == ("PNEUMONIA" if p >= model.threshold else "NORMAL") and row["error"] == ""
    assert "not a readable image" in rows["text_named.jpg"]["error"] and rows["text_named.jpg"]["p_pneumonia"] == ""
    assert "empty" in rows["empty.png"]["error"]
    assert "adult chest X-ray" in rows[ADULT_EXAMPLE.name]["out_of_domain"], "the CSV says why"
    assert "8 of 10 files predicted (2 unreadable" in result.stderr


def test_fast_path_and_batching_can_be_turned_off(served_model_dir, exact, tmp_path):
    """PNEUMONIA_VIT_FAST=0 PNEUMONIA_VIT_BATCH=0: the app as before the fast path, fp32 PyTorch for
    /predict too, each request scored on its own; bad input is still an error."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    log = tmp_path / "app.log"
    with running_app(served_model_dir, log, env={"PNEUMONIA_VIT_FAST": "0", "PNEUMONIA_VIT_BATCH": "0"}) as app:
        url = app.url
        client = Client(url, verbose=False)
        for path in EXAMPLES[:3]:
            value = call(client, path)
            p, decision = expected(exact, path)
            assert confidences(value)["PNEUMONIA"] == pytest.approx(p, abs=1e-4) and value["label"] == decision
        (tmp_path / "notes.jpg").write_text("not an image")
        with pytest.raises(AppError, match="not a readable image"):
            call(client, tmp_path / "notes.jpg")
        with ThreadPoolExecutor(max_workers=4) as pool:
            answers = list(pool.map(lambda path: confidences(call(Client(url, verbose=False), path))["PNEUMONIA"], EXAMPLES[:4]))
        for path, answer in zip(EXAMPLES[:4], answers):
            assert answer == pytest.approx(expected(exact, path)[0], abs=1e-4)
    text = log.read_text()
    assert "/predict with torch-fp32, unbatched" in text and "batch of" not in text
