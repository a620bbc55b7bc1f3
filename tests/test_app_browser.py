"""The page in a real browser: Debian's chromium driven by Playwright, against `python app.py`.

Writes test-artifacts/screenshot.png (git-ignored); docs/screenshot.png is a copy made by hand.
Needs /usr/bin/chromium (apt-get install chromium) and the playwright Python package; without them
the tests skip outside CI and fail in CI.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from pneumonia_vit.images import load_xray
from pneumonia_vit.inference.classifier import Classifier
from tests.app_server import REPO, running_app
from tests.odd_files import make_odd_files

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]
ARTIFACTS = REPO / "test-artifacts"
EXAMPLES = sorted(path for path in (REPO / "examples").glob("*.jpeg") if not path.name.startswith("adult_"))  # pediatric
ADULT_EXAMPLE = REPO / "examples" / "adult_1.jpeg"
TIMEOUT_MS = 30_000


def _require_browser():
    message = None
    if not Path(CHROMIUM).is_file():
        message = f"{CHROMIUM} not found (apt-get install chromium, or set CHROMIUM_PATH)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            message = "the playwright Python package is not installed"
    if message:
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def app_url(served_model_dir, tmp_path_factory):
    _require_browser()
    with running_app(served_model_dir, tmp_path_factory.mktemp("app") / "app.log") as app:
        yield app.url


@pytest.fixture(scope="module")
def page(app_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(app_url, wait_until="networkidle")
        yield page
        browser.close()


def expected(classifier: Classifier, path: Path) -> tuple[str, str]:
    """The decision and P(pneumonia) text the page must show for `path`."""
    p = float(classifier.pneumonia_probability([load_xray(path)])[0])
    return ("PNEUMONIA" if p >= classifier.threshold else "NORMAL"), f"P(pneumonia) = {p:.3f}"


def wait_for_result(page, probability_text: str) -> str:
    page.locator("#decision").get_by_text(probability_text, exact=False).wait_for()
    return page.locator("#prediction [data-testid='label-output-value']").inner_text().strip()


def test_page_shows_disclaimer_upload_and_examples_with_known_labels(page):
    assert "Research demo, not a diagnostic device" in page.locator("#disclaimer").inner_text()
    assert page.locator("#upload input[type=file]").count() == 1
    for name in ("normal 1 · known: NORMAL", "pneumonia 3 · known: PNEUMONIA", "adult 1 · known: adult, outside the domain"):
        assert page.get_by_text(name, exact=True).count() == 1


def test_clicking_an_example_shows_label_decision_and_heatmap(page, classifier):
    example = REPO / "examples" / "pneumonia_1.jpeg"
    decision, probability = expected(classifier, example)
    page.get_by_text("pneumonia 1 · known: PNEUMONIA", exact=True).click()
    assert wait_for_result(page, probability) == decision
    assert f"Decision: {decision}" in page.locator("#decision").inner_text()
    assert page.locator("#decision blockquote").count() == 0, "no out-of-domain warning for a pediatric example"
    heatmap = page.locator("#heatmap img")
    heatmap.wait_for()
    assert re.search(r"gradio_api/file=.+\.jpe?g", heatmap.get_attribute("src"))
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=heatmap.element_handle())
    assert page.locator("#preview img").count() == 1
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "screenshot.png"), full_page=True)
    assert (ARTIFACTS / "screenshot.png").stat().st_size > 20_000


def test_uploading_dicom_then_a_bad_file_then_a_good_one(page, classifier, tmp_path):
    odd = make_odd_files(tmp_path / "odd", EXAMPLES[0])

    def upload(path: Path) -> None:
        # The File component holds one file: clear the current one (its X button) to get the input back.
        clear = page.locator("#upload button[aria-label='Clear']")
        if clear.count():
            clear.click()
        page.locator("#upload input[type=file]").set_input_files(str(path))

    decision, probability = expected(classifier, odd["valid16.dcm"].path)
    upload(odd["valid16.dcm"].path)
    assert wait_for_result(page, probability) == decision

    upload(odd["text_named.jpg"].path)
    error = page.locator("#upload-error")
    error.get_by_text("not a readable image", exact=False).wait_for()
    page.wait_for_timeout(15_000)  # the toast would have faded by now; the panel beside the upload stays
    assert "Cannot read this file." in error.inner_text() and "text_named.jpg: not a readable image" in error.inner_text()
    assert error.bounding_box()["width"] > 200, "a visible block beside the upload"
    assert "Error" not in page.locator("#prediction").inner_text() and page.locator("#decision").inner_text().strip() == ""
    assert page.locator("#heatmap img").count() == 0 and page.locator("#preview img").count() == 0, "results cleared"

    example = REPO / "examples" / "normal_2.jpeg"
    decision, probability = expected(classifier, example)
    upload(example)
    assert wait_for_result(page, probability) == decision
    assert error.inner_text().strip() == "", "the next upload clears the error"


def test_adult_example_shows_the_warning_and_no_diagnosis(page, classifier):
    _, probability = expected(classifier, ADULT_EXAMPLE)
    page.get_by_text("adult 1 · known: adult, outside the domain", exact=True).click()
    heading = wait_for_result(page, probability)
    warning = page.locator("#decision blockquote")
    warning.wait_for(state="visible")
    assert "adult chest X-ray" in warning.inner_text() and "children aged 1-5" in warning.inner_text()
    box = warning.bounding_box()
    assert box["width"] > 200 and box["height"] > 20, "the warning is a visible block, not hidden text"
    assert heading.startswith("Not applicable"), "the page's decision is not a diagnosis"
    decision = page.locator("#decision").inner_text()
    assert "Decision: not applicable" in decision and "unreliable" in decision
    assert "Decision: NORMAL" not in decision and "Decision: PNEUMONIA" not in decision
    labels = page.locator("#prediction").inner_text()
    assert "NORMAL (unreliable)" in labels and "PNEUMONIA (unreliable)" in labels, "probabilities visible, marked"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "screenshot_out_of_domain.png"), full_page=True)


def test_an_example_the_model_gets_wrong_says_so_with_its_error_rate(page, classifier, served_model_dir):
    """normal_1 is one of the bundled model's known false positives."""
    example = REPO / "examples" / "normal_1.jpeg"
    decision, probability = expected(classifier, example)
    if decision == "NORMAL":
        pytest.skip(f"{served_model_dir.name} gets normal_1 right")
    counts = json.loads((served_model_dir / "test_metrics.json").read_text())["confusion_matrix"]
    page.get_by_text("normal 1 · known: NORMAL", exact=True).click()
    assert wait_for_result(page, probability) == "PNEUMONIA"
    text = page.locator("#decision").inner_text()
    assert "This example is known to be NORMAL: the model is wrong here." in text
    normal = counts["tn"] + counts["fp"]
    assert f"the model calls {counts['fp'] / normal:.0%} of normal test children ({counts['fp']} of {normal}) pneumonia" in text
