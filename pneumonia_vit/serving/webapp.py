"""The Gradio page and API around a `serving.Service`; app.py only loads the model and launches.

Endpoints (gradio_client):
    Client(url).predict(handle_file("x.jpeg"), api_name="/predict")
        -> {"label": decision at the stored threshold, "confidences": [{"label", "confidence"} x 2]}
    Client(url).predict(handle_file("x.jpeg"), api_name="/assess")
        -> {"decision": "NORMAL" | "PNEUMONIA" | None, "decision_applicable": bool,
            "probabilities": {"NORMAL": p, "PNEUMONIA": p}, "probabilities_reliable": bool,
            "threshold": t, "warning": None | plain-words text,
            "domain": {"in_domain": bool, "looks_like": "pediatric_chest_xray" | "adult_chest_xray" |
                       "altered_chest_film" | "not_an_xray" | "colour_image" | "blank_image" |
                       "unfamiliar_to_the_model", "reasons": [...], "rules_fired": ["colour" |
                       "blank" | "kind" | "features", ...], "checks": "...",
                       "p_pediatric_chest_xray": p | None}}
    Client(url).predict(handle_file("x.jpeg"), api_name="/analyze")
        -> (preview image, label value, decision and domain note as Markdown, heatmap image)

/predict answers every input as it always has (the decision at the threshold, even for an input
outside the model's domain); /assess is the same scoring with the out-of-domain verdict
(pneumonia_vit/ood/check.py): where `in_domain` is false, `decision` is None and the probabilities are
unreliable. On the page (/analyze) such an input gets a warning, its decision is "not applicable"
and its probabilities are labelled unreliable.

/predict and /assess are scored by the service's scoring model (the fast path unless PNEUMONIA_VIT_FAST=0) and,
unless PNEUMONIA_VIT_BATCH=0, concurrent requests to them share one forward (serving.Service.predict;
why not gradio's `batch=True`: pneumonia_vit/serving/batching.py). /analyze, the page, runs the fp32 PyTorch
model, whose attention weights make the heatmap.

Input is a gr.File, not a gr.Image: gr.Image decodes uploads in the browser and on the server
with PIL's defaults, which cannot read DICOM and would bypass `load_xray` (16-bit windowing, EXIF,
size limits). The file goes to `load_xray` as uploaded; the page previews what it decoded.
"""

from __future__ import annotations

import hashlib
import hmac
import io
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
from .service import REPO, Analysis, Service
from .uploads import RequestGuard, UploadLedger, UploadLimits, releasing, shortened, unknown_endpoint

EXAMPLES_DIR = REPO / "examples"
MAX_UPLOAD_MB = 25  # a 3000x3000 16-bit DICOM is ~18 MB; Kermany JPEG originals are < 3 MB
# gradio's own upload cap, above MAX_UPLOAD_MB so that a file a little too large still reaches `run`
# and hears the limit in MB (gradio_client states gradio's cap in bytes, naming no component).
TRANSPORT_CAP_MB = 2 * MAX_UPLOAD_MB
CACHE_NAME_KEY = secrets.token_bytes(32)  # cached_image's folder names
# gradio keeps a copy of the page's configuration for each of its last N sessions (10,000 by default, ~10 KB
# each: the memory a Space grows by with every new visitor); this app keeps nothing per session, and a
# session whose copy was dropped gets a new one at its next request.
SESSION_CAPACITY = 256
CONCURRENCY = 2  # a cpu-basic Space has 2 vCPUs; more parallel forwards only share them
# A waiting request (settings.DEFAULT_MAX_WAITING of them at most) holds only the path of its upload,
# which gradio keeps on disk (at most TRANSPORT_CAP_MB each): the memory a crowd costs is that of the
# requests being scored, CONCURRENCY + the batch size, whatever the queue holds.

DISCLAIMER = (
    "**Research demo, not a diagnostic device.** It must not be used to diagnose, treat or triage "
    "anyone. The model saw only pediatric (1-5 years) chest X-rays from one hospital (Kermany et al. 2018)."
)

log = logging.getLogger("pneumonia_vit.serving.webapp")


NOT_APPLICABLE = "Not applicable: outside this model's domain"
UNRELIABLE = " (unreliable)"
# Examples carry their known answer in their file name: normal_1.jpeg, pneumonia_2.jpeg, adult_1.jpeg.
KNOWN_LABELS = {"normal": "NORMAL", "pneumonia": "PNEUMONIA", "adult": "adult, outside the domain"}
# The out-of-domain warning is the decision Markdown's only block quote (_decision_markdown).
PAGE_CSS = """
#decision blockquote { border-left: 6px solid #c62828; background: #fdecea; color: #7f1d1d;
                       padding: 0.6em 1em; margin: 0 0 0.8em 0; font-size: 1.1em; }
"""


def decision_label(mark_out_of_domain: bool = False, **options) -> gr.Label:
    """A gr.Label whose heading is the decision at the model's stored threshold.

    gr.Label heads with the most probable class, i.e. a 0.5 cut-off; this model's cut-off was chosen
    on validation (config.json `decision_threshold`). With `mark_out_of_domain` (the page), an input
    outside the domain is headed "not applicable" and its probabilities are labelled unreliable.
    The component's `postprocess` is replaced on this one instance rather than in a subclass: gradio
    writes a .pyi stub beside the source file of every Component subclass, which would litter the
    package at import time.
    """
    label = gr.Label(**options)
    default = label.postprocess

    def postprocess(value):
        if isinstance(value, Analysis):
            ranked = sorted(value.probabilities.items(), key=lambda item: item[1], reverse=True)
            marked = mark_out_of_domain and not value.domain.in_domain
            suffix = UNRELIABLE if marked else ""
            return LabelData(
                label=NOT_APPLICABLE if marked else value.decision,
                confidences=[LabelConfidence(label=name + suffix, confidence=round(p, 6)) for name, p in ranked],
            )
        return default(value)

    label.postprocess = postprocess
    return label


def upload_file(**options) -> gr.File:
    """A gr.File (type="filepath") whose server side hands the uploaded file's path to `run` as is.

    gr.File's own preprocess refuses suffixes outside `file_types` with a message listing all of
    them and a traceback in the log, and leaves an empty temporary file in gradio's cache on every
    call (never deleted). `load_xray` reads the content whatever the suffix and says what to do;
    `file_types` still filters the page's file picker. Replaced on this instance, as in
    `decision_label`.
    """
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
    """`image` as a JPEG in gradio's cache, in a folder named by a keyed hash of its content (a plain hash
    would tell anyone holding a candidate image whether it was analysed here; the key lives and dies
    with the process); written under a temporary name and renamed into place. gradio's own saving
    rewrites the same file in place when two answers hold the same image, and a client downloading it at
    that moment loses its connection mid-body."""
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


def warning_text(analysis: Analysis) -> str | None:
    """The plain-words warning for an input outside the domain (None inside it)."""
    domain = analysis.domain
    if domain.in_domain:
        return None
    reasons = "; ".join(domain.reasons)
    return f"Out of domain: {reasons[0].upper() + reasons[1:]}. No diagnosis is given for this image."


def verdict(analysis: Analysis) -> dict:
    """/assess's answer (documented at the top of this module)."""
    applicable = analysis.domain.in_domain
    return {
        "decision": analysis.decision if applicable else None,
        "decision_applicable": applicable,
        "probabilities": {name: round(p, 6) for name, p in analysis.probabilities.items()},
        "probabilities_reliable": applicable,
        "threshold": analysis.threshold,
        "warning": warning_text(analysis),
        "domain": analysis.domain.verdict(),
    }


def _decision_markdown(analysis: Analysis, threshold_stored: bool = True) -> str:
    p = analysis.p_pneumonia
    relation = "≥" if p >= analysis.threshold else "<"
    origin = ("chosen on the validation split and stored with the model" if threshold_stored
              else "the default: this model stores no threshold of its own")
    domain = analysis.domain
    if domain.in_domain:
        return (
            f"### Decision: {analysis.decision}\n"
            f"P(pneumonia) = {p:.3f} {relation} the model's threshold {analysis.threshold:.3f} ({origin})."
            f"\n\n**In domain.** {domain.message()}"
        )
    return (
        f"> ### ⚠ {warning_text(analysis)}\n\n"
        f"### Decision: not applicable\n"
        f"The model only knows frontal chest X-rays of children aged 1-5, so its answer here means nothing. "
        f"Shown for the curious only, **unreliable**: P(pneumonia) = {p:.3f} {relation} the model's threshold "
        f"{analysis.threshold:.3f}."
    )


def example_label(path: Path) -> str:
    """`normal_1.jpeg` -> "normal 1 · known: NORMAL"."""
    known = KNOWN_LABELS.get(path.stem.split("_")[0])
    name = path.stem.replace("_", " ")
    return f"{name} · known: {known}" if known else name


def _model_name(model_id: str) -> str:
    """A Hub id as is; a local folder by its name only (no server paths on the page)."""
    return Path(model_id).name if Path(model_id).is_dir() else model_id


def build_demo(service: Service, examples_dir: Path = EXAMPLES_DIR, max_waiting: int = DEFAULT_MAX_WAITING) -> gr.Blocks:
    def run(file_path: str | None, explain: bool) -> Analysis | None:
        if not file_path:
            raise gr.Error("No file received: upload a PNG, JPEG or DICOM (.dcm) chest X-ray.", print_exception=False)
        megabytes = Path(file_path).stat().st_size / 2**20
        if megabytes > MAX_UPLOAD_MB:
            message = (f"{Path(file_path).name}: the file is {megabytes:.0f} MB; the limit is {MAX_UPLOAD_MB} MB. "
                       "Save the X-ray as JPEG or PNG, or downscale it, before uploading.")
            log.info("rejected upload: %s", message)
            raise gr.Error(message, title="File too large", print_exception=False)
        started = time.perf_counter()
        try:
            analysis = service.analyze(file_path, explain=True) if explain else service.predict(file_path)
        except InvalidImageError as error:
            log.info("rejected upload: %s", error)
            raise gr.Error(str(error), title="Cannot read this file", print_exception=False) from None
        log.info("%s %s p=%.4f %s in %.0f ms%s", "analyze" if explain else "predict", Path(file_path).suffix,
                 analysis.p_pneumonia, "in-domain" if analysis.domain.in_domain else "OUT-OF-DOMAIN",
                 1000 * (time.perf_counter() - started),
                 f" (batch of {analysis.batch_size})" if analysis.batch_size > 1 else "")
        return analysis

    def analyze(file_path: str | None):
        if not file_path:  # the file was cleared: clear the results
            return None, None, "", None
        analysis = run(file_path, explain=True)
        return (cached_image(analysis.preview, preview.GRADIO_CACHE), analysis,
                _decision_markdown(analysis, threshold_stored), cached_image(analysis.heatmap, heatmap.GRADIO_CACHE))

    async def admit(file_path: str | None):
        """Runs as each request joins the queue (on the event loop, no thread): a full queue refuses at
        once, saying what to do. Requests joining at the same instant may all pass, a few over the limit."""
        waiting = len(demo._queue)  # gradio counts its waiting events only here (no public API)
        if waiting >= max_waiting:
            return gr.validate(False, f"busy: {waiting} requests ahead, retry in a few seconds.")
        return gr.validate(True, "")

    def predict(file_path: str | None):
        """P(NORMAL) and P(PNEUMONIA) for one chest X-ray file (PNG, JPEG or DICOM); the label is the
        decision at the model's stored threshold."""
        return run(file_path, explain=False)

    def assess(file_path: str | None) -> dict:
        """/predict's scoring with the out-of-domain verdict: the decision is None, and the
        probabilities unreliable, for an input that is not a pediatric chest X-ray."""
        return verdict(run(file_path, explain=False))

    examples = sorted(str(path) for path in examples_dir.glob("*.jpeg")) if examples_dir.is_dir() else []
    if service.explainer is None:
        raise ValueError("the page needs the explaining model: Service.load(..., explain=True)")
    patch = service.explainer.config.patch_size
    threshold_stored = service.classifier.info.threshold_stored
    with gr.Blocks(title="Pneumonia X-ray ViT (research demo)", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            "# Pediatric pneumonia on chest X-rays: a small Vision Transformer\n"
            f"Upload a frontal chest X-ray (PNG, JPEG or DICOM). Model: `{_model_name(service.model_id)}`."
        )
        gr.Markdown(DISCLAIMER, elem_id="disclaimer")
        with gr.Row():
            with gr.Column():
                # The page's file picker offers these suffixes; DICOM files need .dcm to be offered.
                upload = upload_file(label="Chest X-ray (PNG, JPEG or DICOM .dcm)", file_types=list(IMAGE_SUFFIXES),
                                     elem_id="upload")
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
                label = decision_label(mark_out_of_domain=True, label="Decision at the model's threshold, and probabilities",
                                       num_top_classes=2, elem_id="prediction")
                decision = gr.Markdown(label="Decision and domain check", elem_id="decision")
                heatmap = gr.Image(label="Attention rollout: where the model looked (not evidence of disease)",
                                   type="pil", format="jpeg", interactive=False, height=360, elem_id="heatmap")
        # The page's analyses: at most CONCURRENCY PyTorch forwards at a time.
        upload.change(analyze, inputs=upload, outputs=[preview, label, decision, heatmap], api_name="analyze",
                      concurrency_id="model", validator=admit)
        # The API endpoints: /predict (issue #3, the label value only, no images) and /assess (the
        # same with the domain verdict, as JSON). Their button and outputs are never shown: they
        # exist so that the endpoints have gr.File in and gr.Label / gr.JSON out, which gradio_client
        # reads. /predict's label is not the page's: it keeps the decision for every input.
        # Batched: their own group, max_batch requests in flight, one forward at a time for all of them.
        # Unbatched (PNEUMONIA_VIT_BATCH=0): they share the page's group, CONCURRENCY forwards in all.
        api_trigger = gr.Button(visible=False)
        api_label = decision_label(visible=False)
        api_verdict = gr.JSON(visible=False)
        group = (dict(concurrency_id="predict", concurrency_limit=service.max_batch) if service.batcher is not None
                 else dict(concurrency_id="model"))
        api_trigger.click(predict, inputs=upload, outputs=api_label, api_name="predict", validator=admit, **group)
        api_trigger.click(assess, inputs=upload, outputs=api_verdict, api_name="assess", validator=admit, **group)
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
