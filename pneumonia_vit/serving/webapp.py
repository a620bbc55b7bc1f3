"""The Gradio page and API around a `Service`. The endpoints and their answers: README.md's API section
(the forms are `Analysis.answer`'s). Every endpoint, the page included, scores with the service's scoring model.

Input is a gr.File, not a gr.Image: gr.Image decodes uploads with PIL's defaults, which cannot read DICOM
and would bypass `read_xray`'s limits; the page previews what `read_xray` decoded.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import os
import secrets
import tempfile
import time
from pathlib import Path

import gradio as gr
from gradio.components.label import LabelConfidence, LabelData
from gradio.data_classes import ListFiles
from gradio.route_utils import FnIndexInferError
from gradio.utils import get_upload_folder
from PIL import Image
from starlette.middleware import Middleware

from ..images import IMAGE_SUFFIXES, InvalidImageError
from ..settings import DEFAULT_MAX_WAITING
from .service import REPO, Analysis, OutOfDomainError, Service
from .uploads import RequestGuard, UploadLedger, UploadLimits, releasing, shortened, unknown_endpoint

EXAMPLES_DIR = REPO / "examples"
MAX_UPLOAD_MB = 25  # a 3000x3000 16-bit DICOM is ~18 MB; Kermany JPEG originals are < 3 MB
# gradio's own upload cap, above MAX_UPLOAD_MB so that a file a little too large still reaches `run`
# and hears the limit in MB (gradio_client states gradio's cap in bytes, naming no component).
TRANSPORT_CAP_MB = 2 * MAX_UPLOAD_MB
CACHE_NAME_KEY = secrets.token_bytes(32)  # cached_image's folder names
# gradio keeps a copy of the page's configuration per session, a memory that grows with every visitor; this
# app keeps nothing per session, and a session whose copy was dropped gets a new one at its next request.
SESSION_CAPACITY = 64
# Requests being read and scored at once, all endpoints together: a cpu-basic Space has 2 vCPUs. A waiting
# request holds only its upload's path (the file is on disk), so a crowd costs the memory of CONCURRENCY requests.
CONCURRENCY = 2

DISCLAIMER = (
    "**Research demo, not a diagnostic device.** It must not be used to diagnose, treat or triage "
    "anyone. The model saw only pediatric (1-5 years) chest X-rays from one hospital (Kermany et al. 2018)."
)

log = logging.getLogger("pneumonia_vit.serving.webapp")


NOT_APPLICABLE = "Not applicable: outside this model's domain"
UNRELIABLE = " (unreliable)"
MAX_BATCH_FILES = 32  # /predict_batch: about a second of scoring on 2 cores; more files, more calls
# Examples carry their known answer in their file name: normal_1.jpeg, pneumonia_2.jpeg, adult_1.jpeg.
KNOWN_LABELS = {"normal": "NORMAL", "pneumonia": "PNEUMONIA", "adult": "adult, outside the domain"}
API_EXAMPLE = "pneumonia_1.jpeg"  # the X-ray view_api() and the "Use via API" page show as the example input
# The out-of-domain warning is the decision Markdown's only block quote (_decision_markdown); an error
# stays in the panel beside the upload until the next upload.
PAGE_CSS = """
#decision blockquote, #upload-error p { border-left: 6px solid #c62828; background: #fdecea; color: #7f1d1d;
                                        padding: 0.6em 1em; margin: 0 0 0.8em 0; font-size: 1.1em; }
"""


def decision_label(**options) -> gr.Label:
    """A gr.Label that shows an `Analysis.answer("predict")`-shaped value as it is, headed by its "label" (gr.Label's
    own postprocess heads with the most probable class, a 0.5 cut-off). Patched on the instance: gradio writes a
    .pyi stub beside the source of every Component subclass."""
    label = gr.Label(**options)
    default = label.postprocess

    def postprocess(value):
        if isinstance(value, dict) and isinstance(value.get("confidences"), list):
            return LabelData(label=value["label"], confidences=[LabelConfidence(**item) for item in value["confidences"]])
        return default(value)

    label.postprocess = postprocess
    return label


def upload_file(**options) -> gr.File:
    """A gr.File (type="filepath") that hands the uploaded file's path to `run` as is: gr.File's own preprocess
    refuses suffixes outside `file_types` with a traceback and leaves an empty temporary file behind on every
    call, while `read_xray` reads the content whatever the suffix. `file_types` still filters the page's picker."""
    upload = gr.File(type="filepath", **options)

    def preprocess(payload):
        if payload is None:
            return None
        path = str((payload[0] if isinstance(payload, ListFiles) else payload).path)
        # gradio checks that a path is in its upload folder only for some payloads (not for a URL
        # marked as a stream): the app reads no file that was not uploaded to it.
        if not Path(path).resolve().is_relative_to(Path(get_upload_folder()).resolve()):
            log.info("refused a path outside the upload folder: %s", shortened(path))
            raise gr.Error("Upload the file (gradio_client: handle_file(path)); the app reads only files uploaded "
                           "to it.", title="Not an uploaded file", print_exception=False)
        if not Path(path).is_file():
            raise gr.Error("The uploaded file is gone: each upload serves one request, upload the file again.",
                           title="Upload expired", print_exception=False)
        return path

    upload.preprocess = preprocess
    return upload


def cached_image(image: Image.Image | None, cache_dir: str) -> str | None:
    """`image` as a JPEG in gradio's cache, in a folder named by a keyed hash of its content (a plain hash would
    tell anyone holding a candidate image whether it was analysed here), renamed into place: gradio's own saving
    rewrites a file in place when two answers hold the same image, cutting off a client downloading it."""
    if image is None:
        return None
    buffer = io.BytesIO()
    image.save(buffer, "JPEG")
    data = buffer.getvalue()
    folder = Path(cache_dir) / hmac.new(CACHE_NAME_KEY, data, hashlib.sha256).hexdigest()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "image.jpeg"
    if not path.exists():
        descriptor, staging = tempfile.mkstemp(dir=folder, prefix=".image.")
        with os.fdopen(descriptor, "wb") as staged:
            staged.write(data)
        os.replace(staging, path)
    return str(path)


def _page_label(analysis: Analysis) -> dict:
    """The decision and probabilities; outside the domain headed "not applicable", probabilities marked unreliable."""
    if analysis.decision is not None:
        return analysis.answer("predict")
    ranked = sorted(analysis.probabilities.items(), key=lambda item: item[1], reverse=True)
    return {"label": NOT_APPLICABLE, "confidences": [{"label": name + UNRELIABLE, "confidence": round(p, 6)}
                                                     for name, p in ranked]}


def _decision_markdown(analysis: Analysis, threshold_stored: bool = True) -> str:
    p = analysis.p_pneumonia
    relation = "≥" if p >= analysis.threshold else "<"
    origin = ("chosen on the validation split and stored with the model" if threshold_stored
              else "the default: this model stores no threshold of its own")
    if analysis.decision is not None:
        return (
            f"### Decision: {analysis.decision}\n"
            f"P(pneumonia) = {p:.3f} {relation} the model's threshold {analysis.threshold:.3f} ({origin})."
            f"\n\n**In domain.** {analysis.domain.message()}"
        )
    return (
        f"> ### ⚠ {analysis.refusal}\n\n"
        f"### Decision: not applicable\n"
        f"The model only knows frontal chest X-rays of children aged 1-5, so its answer here means nothing. "
        f"Shown for the curious only, **unreliable**: P(pneumonia) = {p:.3f} {relation} the model's threshold "
        f"{analysis.threshold:.3f}."
    )


def measured_error_rates(model_id: str) -> dict[str, str]:
    """For each true label, how often the model gets test films of it wrong, in words, from the model folder's
    test_metrics.json (train_vit.py writes it); empty where there is none."""
    path = Path(model_id) / "test_metrics.json"
    if not path.is_file():
        return {}
    counts = json.loads(path.read_text())["confusion_matrix"]
    normal, pneumonia = counts["tn"] + counts["fp"], counts["fn"] + counts["tp"]
    return {
        "NORMAL": f"the model calls {counts['fp'] / normal:.0%} of normal test children ({counts['fp']} of {normal}) pneumonia",
        "PNEUMONIA": f"the model calls {counts['fn'] / pneumonia:.0%} of test children with pneumonia "
                     f"({counts['fn']} of {pneumonia}) normal",
    }


def known_label(path: str | Path) -> str | None:
    return KNOWN_LABELS.get(Path(path).stem.split("_")[0])


def example_label(path: Path) -> str:
    """`normal_1.jpeg` -> "normal 1 · known: NORMAL"."""
    known = known_label(path)
    name = path.stem.replace("_", " ")
    return f"{name} · known: {known}" if known else name


def _wrong_example_note(name: str, examples: list[str], analysis: Analysis, error_rates: dict[str, str]) -> str:
    """Where `name` is one of the examples and its known label is not the model's decision, says so."""
    known = known_label(name)
    if name not in {Path(path).name for path in examples} or analysis.decision in (None, known):
        return ""
    rate = f": {error_rates[known]}" if known in error_rates else ""
    return (f"\n\n**This example is known to be {known}: the model is wrong here.** It is one of the model's "
            f"known errors{rate}.")


def _model_name(model_id: str) -> str:
    """A Hub id as is; a local folder by its name only (no server paths on the page)."""
    return Path(model_id).name if Path(model_id).is_dir() else model_id


def _size_error(file_path: str) -> str | None:
    megabytes = Path(file_path).stat().st_size / 2**20
    if megabytes <= MAX_UPLOAD_MB:
        return None
    return (f"{Path(file_path).name}: the file is {megabytes:.0f} MB; the limit is {MAX_UPLOAD_MB} MB. "
            "Save the X-ray as JPEG or PNG, or downscale it, before uploading.")


def _api_file(example: dict | list, **options) -> gr.File:
    """A hidden upload_file for an API endpoint, whose "Use via API" example input is `example`
    (gr.File's own is a PDF). With file_count="multiple", each file goes through upload_file's checks."""
    component = upload_file(visible=False, **options)
    if options.get("file_count") == "multiple":
        single = component.preprocess
        component.preprocess = lambda payload: None if payload is None else [single(item) for item in payload.root]
    component.example_payload = lambda: example
    return component


def build_demo(service: Service, examples_dir: Path = EXAMPLES_DIR, max_waiting: int = DEFAULT_MAX_WAITING) -> gr.Blocks:
    def logged(kind: str, file_path: str, analysis: Analysis, started: float) -> Analysis:
        log.info("%s %s p=%.4f %s in %.0f ms", kind, Path(file_path).suffix, analysis.p_pneumonia,
                 "in-domain" if analysis.domain.in_domain else "OUT-OF-DOMAIN", 1000 * (time.perf_counter() - started))
        return analysis

    def run(file_path: str | None, explain: bool) -> Analysis:
        if not file_path:
            raise gr.Error("No file received: upload a PNG, JPEG or DICOM (.dcm) chest X-ray.", print_exception=False)
        too_large = _size_error(file_path)
        if too_large:
            log.info("rejected upload: %s", too_large)
            raise gr.Error(too_large, title="File too large", print_exception=False)
        started = time.perf_counter()
        try:
            analysis = service.analyze(file_path, explain=explain)
        except InvalidImageError as error:
            log.info("rejected upload: %s", error)
            raise gr.Error(str(error), title="Cannot read this file", print_exception=False) from None
        return logged("analyze" if explain else "predict", file_path, analysis, started)

    def analyze(file_path: str | None):
        """The page: the preview, decision, note and heatmap, or the error (in the panel beside the upload)."""
        if not file_path:  # the file was cleared: clear the results
            return None, None, "", None, ""
        try:
            analysis = run(file_path, explain=True)
        except gr.Error as error:
            return None, None, "", None, f"**{error.title}.** {error.message}"
        note = _wrong_example_note(Path(file_path).name, examples, analysis, error_rates)
        return (cached_image(analysis.preview, preview.GRADIO_CACHE), _page_label(analysis),
                _decision_markdown(analysis, threshold_stored) + note,
                cached_image(analysis.heatmap, heatmap.GRADIO_CACHE), "")

    async def admit(file_path):
        """Runs as each request joins the queue (on the event loop, no thread): a full queue refuses at
        once, saying what to do. Requests joining at the same instant may all pass, a few over the limit."""
        waiting = len(demo._queue)  # gradio counts its waiting events only here (no public API)
        if waiting >= max_waiting:
            return gr.validate(False, f"busy: {waiting} requests ahead, retry in a few seconds.")
        return gr.validate(True, "")

    def predict(file_path: str | None) -> dict:
        try:
            return run(file_path, explain=False).answer("predict")
        except OutOfDomainError as refusal:
            raise gr.Error(str(refusal), title="Out of domain", print_exception=False) from None

    def predict_batch(file_paths: list[str] | None) -> list[dict]:
        if not file_paths:
            raise gr.Error("No files received: send a list of PNG, JPEG or DICOM (.dcm) chest X-rays.",
                           print_exception=False)
        if len(file_paths) > MAX_BATCH_FILES:
            raise gr.Error(f"{len(file_paths)} files in one call; the limit is {MAX_BATCH_FILES}: send them in "
                           f"calls of at most {MAX_BATCH_FILES}.", title="Too many files", print_exception=False)
        started = time.perf_counter()
        answers: list[dict] = []
        sized: list[tuple[int, str]] = []  # (index, path) of the files within the size limit
        for path in file_paths:
            too_large = _size_error(path)
            answers.append({"file": Path(path).name, **({"error": too_large, "error_kind": "too_large", "domain": None}
                                                         if too_large else {})})
            if not too_large:
                sized.append((len(answers) - 1, path))
        for (index, path), result in zip(sized, service.analyze_files([path for _, path in sized])):
            if isinstance(result, InvalidImageError):
                answers[index].update(error=str(result), error_kind="unreadable", domain=None)
            else:
                answers[index].update(logged("predict_batch", path, result, started).answer("batch"))
        return answers

    def assess(file_path: str | None) -> dict:
        return run(file_path, explain=False).answer("assess")

    examples = sorted(str(path) for path in examples_dir.glob("*.jpeg")) if examples_dir.is_dir() else []
    if service.explainer is None:
        raise ValueError("the page needs the explaining model: Service.load(..., explain=True)")
    patch = service.explainer.config.patch_size
    threshold_stored = service.classifier.info.threshold_stored
    error_rates = measured_error_rates(service.model_id)
    api_example = next((path for path in examples if Path(path).name == API_EXAMPLE), examples[0] if examples else None)
    example_file = ({"path": os.path.relpath(api_example, REPO) if Path(api_example).is_relative_to(REPO) else api_example,
                     "meta": {"_type": "gradio.FileData"}} if api_example else None)
    checks_note = "".join(f"\n\n*Note: {note}.*" for note in service.check_notes)
    with gr.Blocks(title="Pneumonia X-ray ViT (research demo)", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            "# Pediatric pneumonia on chest X-rays: a small Vision Transformer\n"
            f"Upload a frontal chest X-ray (PNG, JPEG or DICOM). Model: `{_model_name(service.model_id)}`.{checks_note}",
            elem_id="model",
        )
        gr.Markdown(DISCLAIMER, elem_id="disclaimer")
        # The API endpoints come first, so that view_api() and the "Use via API" page list them first.
        # Their inputs, button and outputs are never shown: they exist so that the endpoints have gr.File
        # in and gr.Label / gr.JSON out, which gradio_client reads, with names that document them.
        api_trigger = gr.Button(visible=False)
        api_file = _api_file(example_file, label="Chest X-ray file (PNG, JPEG or DICOM)")
        api_files = _api_file([example_file] if example_file else [], file_count="multiple",
                              label=f"Chest X-ray files (PNG, JPEG or DICOM), at most {MAX_BATCH_FILES}")
        api_trigger.click(predict, inputs=api_file, validator=admit, api_name="predict", concurrency_id="model",
                          outputs=decision_label(visible=False, label="Decision at the model's threshold, and probabilities"),
                          api_description="The decision at the model's stored threshold and the probabilities of one "
                                          "chest X-ray; an input outside the model's domain is an error titled "
                                          "'Out of domain' that says why and what to do.")
        api_trigger.click(predict_batch, inputs=api_files, validator=admit, api_name="predict_batch",
                          concurrency_id="model", outputs=gr.JSON(visible=False, label="One answer per file, in input order"),
                          api_description=f"/predict for up to {MAX_BATCH_FILES} files in one call: one object per file, "
                                          "in input order, with the file's name and /predict's answer and the domain "
                                          "verdict, or that file's own error; one bad file never fails the others.")
        api_trigger.click(assess, inputs=api_file, validator=admit, api_name="assess", concurrency_id="model",
                          outputs=gr.JSON(visible=False, label="Decision, probabilities and domain verdict"),
                          api_description="/predict's answer as data: the decision (None outside the domain), both "
                                          "probabilities and whether they are reliable, the threshold, the refusal "
                                          "and the out-of-domain verdict.")
        with gr.Row():
            with gr.Column():
                # The page's file picker offers these suffixes; DICOM files need .dcm to be offered.
                upload = upload_file(label="Chest X-ray (PNG, JPEG or DICOM .dcm)", file_types=list(IMAGE_SUFFIXES),
                                     elem_id="upload")
                upload.example_payload = api_file.example_payload  # /analyze's example in the API description
                upload_error = gr.Markdown(label="Error", elem_id="upload-error")
                preview = gr.Image(label="X-ray as the model reads it", type="pil", format="jpeg",
                                   interactive=False, height=360, elem_id="preview")
                if examples:
                    gr.Examples(
                        examples=[[path] for path in examples], inputs=[upload],
                        example_labels=[example_label(Path(path)) for path in examples],
                        label="Examples with their known labels: pediatric test-split X-rays (Kermany et al. 2018, "
                              "CC BY 4.0) and an adult X-ray (NIH ChestX-ray14, Wang et al. 2017)",
                    )
            with gr.Column():
                label = decision_label(label="Decision at the model's threshold, and probabilities",
                                       num_top_classes=2, elem_id="prediction")
                decision = gr.Markdown(label="Decision and domain check", elem_id="decision")
                heatmap = gr.Image(label="Attention rollout: where the model looked (not evidence of disease)",
                                   type="pil", format="jpeg", interactive=False, height=360, elem_id="heatmap")
        upload.change(analyze, inputs=upload, outputs=[preview, label, decision, heatmap, upload_error],
                      api_name="analyze", concurrency_id="model", validator=admit,
                      api_description="The page's own call: the preview, the decision, its note and the heatmap, "
                                      "or an error in the last output.")
        gr.Markdown(
            f"The heatmap is attention rollout (Abnar & Zuidema 2020) over the model's {patch}-pixel patches: "
            "where the [CLS] token gathers information from, for either answer. Examples and training data: "
            "Kermany D.S. et al., *Cell* 172(5):1122-1131, 2018, CC BY 4.0."
        )
    # No max_size: gradio's own refusal says only "Queue is full! Please try again."; `admit` bounds the queue.
    # Queue positions go out once a second: gradio's "auto" sends every waiting request a message each
    # time any request starts, work that grows with the square of the queue under a crowd.
    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=None, status_update_rate=1)
    return demo


def launch(demo: gr.Blocks, upload_limits: UploadLimits | None = None, **overrides):
    """Launch with this app's limits; server name and port come from GRADIO_SERVER_NAME / _PORT
    (gradio's defaults: 127.0.0.1:7860 locally, 0.0.0.0 on Spaces, where the variable is set).
    Uploads are bounded and deleted once used (pneumonia_vit/serving/uploads.py)."""
    ledger = UploadLedger(get_upload_folder(), upload_limits or UploadLimits(max_file_bytes=TRANSPORT_CAP_MB * 2**20),
                          # the files the app put in gradio's cache before serving: the examples' copies
                          keep=frozenset().union(*demo.temp_file_sets, *(block.keep_in_cache for block in demo.blocks.values())),
                          forget=lambda path: [files.discard(path) for files in demo.temp_file_sets])
    for block_fn in demo.fns.values():
        block_fn.fn = releasing(block_fn.fn, ledger) if block_fn.fn is not None else None
        if block_fn.validator is not None:
            block_fn.validator = releasing(block_fn.validator, ledger, validator=True)
    settings = dict(
        max_file_size=f"{TRANSPORT_CAP_MB}mb",
        # Only the examples are served from disk; uploads and outputs live in gradio's cache.
        allowed_paths=[str(EXAMPLES_DIR)] if EXAMPLES_DIR.is_dir() else None,
        blocked_paths=[str(REPO / name) for name in ("models", "runs", "data", ".git", ".venv")],
        ssr_mode=False,
        css=PAGE_CSS,
        show_error=False,  # unexpected exceptions reach users as a generic error, not a traceback
        state_session_capacity=SESSION_CAPACITY,
        enable_monitoring=False,  # gradio's traffic dashboard: not used, and each visit prints its link to the log
        app_kwargs={"middleware": [Middleware(RequestGuard, ledger=ledger)],
                    "exception_handlers": {FnIndexInferError: unknown_endpoint, KeyError: unknown_endpoint}},
    )
    settings.update(overrides)
    return demo.launch(**settings)
