"""The real app (`python app.py` in a subprocess) called through gradio_client, and predict.py.

The app scores every endpoint, the page included, on the fast path (ONNX Runtime, int8), one image
per forward; the fp32 PyTorch model only draws the page's heatmap. So every answer equals the fast
Classifier on that one image (1e-4, the rounding of the label's confidences), whatever the endpoint or
the concurrency. With PNEUMONIA_VIT_FAST=0 the app serves the fp32 model, equal to it within 1e-4.
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

from pneumonia_vit.images import MIN_SIDE, load_xray
from pneumonia_vit.inference.classifier import Classifier
from tests.app_server import REPO, running_app
from tests.odd_files import BAD, READABLE, make_odd_files

EXAMPLES = sorted(path for path in (REPO / "examples").glob("*.jpeg") if not path.name.startswith("adult_"))  # pediatric
ADULT_EXAMPLE = REPO / "examples" / "adult_1.jpeg"
DEFAULTS = {"PNEUMONIA_VIT_FAST": "1"}  # the app's default, whatever this shell sets


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


def refusal(client, path: Path):
    """/predict's AppError for `path` (fails the test where /predict answers)."""
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as caught:
        call(client, path)
    return caught.value


def test_examples_shipped_with_credit():
    assert len(EXAMPLES) == 6
    assert sum(path.name.startswith("normal") for path in EXAMPLES) == 3
    credit = (REPO / "examples" / "README.md").read_text()
    assert "Kermany" in credit and "CC BY 4.0" in credit
    for path in EXAMPLES:
        assert path.stat().st_size < 100_000 and max(Image.open(path).size) == 512
    assert ADULT_EXAMPLE.is_file() and "NIH" in credit and "Wang" in credit and ADULT_EXAMPLE.name in credit


def test_app_serves_predict_fast_and_analyze_with_pytorch(client, classifier, app_log):
    assert classifier.backend.name == "onnxruntime-int8"
    assert "/predict with onnxruntime-int8, heatmaps with torch-fp32" in app_log.read_text()


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


def test_analyze_returns_preview_decision_note_and_heatmap(client, classifier):
    preview, value, markdown, heatmap, error = call(client, EXAMPLES[-1], "/analyze")
    p, decision = expected(classifier, EXAMPLES[-1])  # the API's numbers; the fp32 model only draws the heatmap
    assert confidences(value)["PNEUMONIA"] == pytest.approx(p, abs=1e-4) and value["label"] == decision
    assert f"Decision: {decision}" in markdown and f"{classifier.threshold:.3f}" in markdown and error == ""
    assert "passed the" in markdown, "an example X-ray is in domain"
    assert all(max(Image.open(image_path).size) == 512 for image_path in (preview, heatmap))
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
    refused = refusal(client, adult_xray)
    assert refused.title == "Out of domain" and refused.message == assessed["warning"]


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


@pytest.fixture(scope="module")
def refused_inputs(tmp_path_factory, classifier) -> dict[str, tuple[Path, str]]:
    """Inputs /predict must refuse, each with the rule that refuses it (the adult film: above)."""
    folder = tmp_path_factory.mktemp("refused")
    Image.fromarray((np.random.default_rng(0).random((256, 256, 3)) * 255).astype(np.uint8)).save(folder / "noise.png")
    film = Image.open(EXAMPLES[0]).convert("RGBA")
    alpha = np.full(film.size[::-1], 255, np.uint8)
    alpha[:, : film.size[0] // 2] = 128
    film.putalpha(Image.fromarray(alpha))
    film.save(folder / "half_transparent.png")
    Image.new("L", (400, 400), 200).save(folder / "blank.png")
    inputs = {name: (folder / name, rule) for name, rule in
              (("noise.png", "colour"), ("half_transparent.png", "transparency"), ("blank.png", "blank"))}
    side = classifier.spec.size - 32  # below the model's input side, above the reader's minimum
    if side >= MIN_SIDE:
        Image.open(EXAMPLES[0]).convert("L").resize((side, side)).save(folder / "small.png")
        inputs["small.png"] = (folder / "small.png", "resolution")
    return inputs


def test_predict_refuses_inputs_outside_the_domain_saying_why_and_what_to_do(client, classifier, refused_inputs):
    messages = {"colour": "colour image", "blank": "nearly blank", "transparency": "without an alpha channel (flattened) and upload it again",
                "resolution": f"needs at least {classifier.spec.size} pixels on the short side: upload the X-ray at a higher"}
    for name, (path, rule) in refused_inputs.items():
        refused = refusal(client, path)
        assert refused.title == "Out of domain" and refused.message.startswith("Out of domain: "), name
        assert messages[rule] in refused.message and "No diagnosis is given" in refused.message, refused.message
        assert rule in call(client, path, "/assess")["domain"]["rules_fired"], name
    assert "partly transparent (50% of pixels)" in refusal(client, refused_inputs["half_transparent.png"][0]).message


def batch(client, paths: list[Path]) -> list[dict]:
    from gradio_client import handle_file

    return client.predict([handle_file(str(path)) for path in paths], api_name="/predict_batch")


def test_predict_batch_answers_each_file_in_order_and_a_bad_file_fails_alone_as_on_predict(client, classifier, odd, adult_xray, tmp_path):
    big = tmp_path / "huge.png"
    big.write_bytes(b"\x89PNG" + b"\x00" * (30 * 2**20))
    files = [EXAMPLES[2], odd["truncated.jpg"].path, adult_xray, big, EXAMPLES[0], EXAMPLES[2]]
    answers = batch(client, files)
    assert [answer["file"] for answer in answers] == [path.name for path in files]
    for index in (0, 4, 5):
        p, decision = expected(classifier, files[index])
        assert answers[index]["label"] == decision and "error" not in answers[index]
        assert confidences(answers[index])["PNEUMONIA"] == pytest.approx(p, abs=1e-4)
        assert answers[index]["domain"]["in_domain"] is True
    assert answers[0] == answers[5], "the same file gets the same answer wherever it is in the batch"
    assert answers[1]["error_kind"] == "unreadable" and "damaged or truncated" in answers[1]["error"]
    assert answers[1]["domain"] is None and "label" not in answers[1]
    assert answers[2]["error_kind"] == "out_of_domain" and answers[2]["error"].startswith("Out of domain: ")
    assert answers[2]["domain"]["looks_like"] == "adult_chest_xray" and "label" not in answers[2]
    assert answers[3] == {"file": "huge.png", "error": refusal(client, big).message, "error_kind": "too_large", "domain": None}
    assert answers[3]["error"].startswith("huge.png: the file is 30 MB; the limit is 25 MB.") and "bytes" not in answers[3]["error"]


def test_predict_batch_refuses_more_than_32_files(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as caught:
        batch(client, [EXAMPLES[0]] * 33)
    assert caught.value.title == "Too many files" and "33 files in one call; the limit is 32" in caught.value.message


def test_every_way_in_gives_the_same_answer(client, served_model_dir, data_root, odd, refused_inputs, tmp_path):
    """40 test films, 40 adult films, the odd and the refused files: the page, /assess, /predict,
    /predict_batch and predict.py give each the same decision (None: refused), the Service's."""
    from gradio_client.exceptions import AppError

    from pneumonia_vit.serving.service import Service

    test_split = data_root / "chest_xray_224" / "test"
    sources = (sorted((test_split / "NORMAL").iterdir())[:20] + sorted((test_split / "PNEUMONIA").iterdir())[:20]
               + sorted((data_root / "adult_cxr_224" / "images").iterdir())[:40]
               + [odd[name].path for name in READABLE] + [path for path, _ in refused_inputs.values()])
    folder = tmp_path / "films"
    folder.mkdir()
    files = [Path(shutil.copy(path, folder / f"{index:03d}_{path.name}")) for index, path in enumerate(sources)]
    service = Service.load(served_model_dir)
    answers = {"service": [analysis.decision for analysis in service.analyze_files(files)], "/predict": [],
               "/assess": [call(client, path, "/assess")["decision"] for path in files], "page": []}
    for path in files:
        try:
            answers["/predict"].append(call(client, path)["label"])
        except AppError as refused:
            assert refused.title == "Out of domain", refused.message
            answers["/predict"].append(None)
        heading = call(client, path, "/analyze")[1]["label"]
        answers["page"].append(None if heading.startswith("Not applicable") else heading)
    answers["/predict_batch"] = [answer.get("label") for start in range(0, len(files), 32)
                                 for answer in batch(client, files[start : start + 32])]
    result = subprocess.run([sys.executable, "predict.py", str(folder), "--output", str(tmp_path / "out.csv"),
                             "--model", str(served_model_dir)], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, **DEFAULTS})
    assert result.returncode == 0, result.stderr[-3000:]
    with (tmp_path / "out.csv").open(newline="") as handle:
        rows = {row["file"]: row["decision"] or None for row in csv.DictReader(handle)}
    answers["predict.py"] = [rows[path.name] for path in files]
    for way, decisions in answers.items():
        disagreements = [path.name for path, mine, theirs in zip(files, decisions, answers["service"]) if mine != theirs]
        assert not disagreements, (way, disagreements)
    assert {None, "NORMAL", "PNEUMONIA"} <= set(answers["service"])


@pytest.mark.parametrize("name", BAD)
def test_bad_input_is_an_error_and_the_server_keeps_serving(client, classifier, odd, name):
    error = refusal(client, odd[name].path)
    assert odd[name].error in error.message and error.title == "Cannot read this file"
    assert str(odd[name].path.parent) not in error.message, "no server paths in messages"
    value = call(client, EXAMPLES[1])
    assert confidences(value)["PNEUMONIA"] == pytest.approx(expected(classifier, EXAMPLES[1])[0], abs=1e-4)


def test_dicom_gets_the_prediction_of_the_image_it_holds(client, odd):
    # valid16.dcm and monochrome1.dcm hold normal_1.jpeg (as 16-bit, and inverted as MONOCHROME1).
    reference = confidences(call(client, EXAMPLES[0]))["PNEUMONIA"]
    for name in ("valid16.dcm", "monochrome1.dcm"):
        assert confidences(call(client, odd[name].path))["PNEUMONIA"] == pytest.approx(reference, abs=0.02), name


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


def test_concurrent_bad_inputs_fail_alone(app_url, classifier, odd):
    """Sixteen clients at once, four with unusable files: those four get their own error, the twelve
    others their prediction, each equal to the Classifier on that image alone."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    jobs = 2 * [EXAMPLES[0], odd["text_named.jpg"].path, *EXAMPLES[1:4], odd["truncated.jpg"].path, *EXAMPLES[4:6]]
    clients = [Client(app_url, verbose=False) for _ in jobs]
    barrier = threading.Barrier(len(jobs))

    def one(index: int):
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
            assert answer == pytest.approx(expected(classifier, path)[0], abs=1e-4), path.name
        else:
            assert isinstance(answer, AppError), (path.name, answer)
            assert odd[path.name].error in str(answer) and path.name in str(answer)
            assert str(path.parent) not in str(answer), "no server paths in messages"


def test_expected_bad_input_is_one_log_line_not_a_traceback(client, odd, app_log):
    """/predict raises the error; the page (/analyze) clears its four panels and shows it in the fifth,
    beside the upload."""
    from gradio_client.exceptions import AppError

    before = len(app_log.read_text().splitlines())
    for name in ("report.pdf", "notes.txt"):
        with pytest.raises(AppError, match="not a readable image. Upload a PNG, JPEG or DICOM") as caught:
            call(client, odd[name].path)
        assert caught.value.title == "Cannot read this file"
        preview, label, markdown, heatmap, error = call(client, odd[name].path, "/analyze")
        assert (preview, label, markdown, heatmap) == (None, {}, "", None)
        assert error.startswith("**Cannot read this file.**") and "not a readable image. Upload a PNG" in error
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


def test_api_description_lists_predict_first_with_named_outputs_and_an_xray_example(client):
    info = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert list(info) == ["/predict", "/predict_batch", "/assess", "/analyze"]
    for name, endpoint in info.items():
        assert endpoint["description"], name
        for output in endpoint["returns"]:
            assert not output["label"].startswith("value_"), (name, output["label"])
        for parameter in endpoint["parameters"]:
            examples = parameter["example_input"] if isinstance(parameter["example_input"], list) else [parameter["example_input"]]
            assert all(example["path"].startswith("examples/") and example["path"].endswith(".jpeg")
                       for example in examples), (name, examples)
    assert info["/predict"]["returns"][0]["label"] == "Decision at the model's threshold, and probabilities"


def test_the_page_names_the_checks_that_cannot_run_for_its_model(tiny_model_dir):
    from pneumonia_vit.serving.service import Service
    from pneumonia_vit.serving.webapp import build_demo

    demo = build_demo(Service.load(str(tiny_model_dir), explain=True))
    heading = next(block.value for block in demo.blocks.values() if getattr(block, "elem_id", None) == "model")
    assert "feature-distance check off" in heading and "image-kind check: the bundled model's" in heading
    assert str(tiny_model_dir.parent) not in heading, "no server paths on the page"


def test_fast_path_can_be_turned_off(served_model_dir, exact, tmp_path):
    """PNEUMONIA_VIT_FAST=0: the app as before the fast path, fp32 PyTorch for /predict too; bad input is
    still an error."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    log = tmp_path / "app.log"
    with running_app(served_model_dir, log, env={"PNEUMONIA_VIT_FAST": "0"}) as app:
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
    assert "/predict with torch-fp32, heatmaps with torch-fp32" in text
