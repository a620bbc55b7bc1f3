"""The fast CPU serving path: the classifier exported to ONNX, its MatMul weights quantized to int8 per output
channel (activations quantized per batch at run time), run by ONNX Runtime with a fixed number of threads.

The first `load_fast_model` for a set of weights exports into a cache folder keyed by a fingerprint of the weights,
the configs, the recipe and the onnxruntime version; later loads read no PyTorch weights. Why this recipe, and what
it costs: benchmarks/inference.py. The patch convolution and the 2-logit head stay fp32 (ConvInteger is slow in
ONNX Runtime, and the head's error would go straight into the logits). One scale per batch means an image's score
moves slightly with its batch companions; one image at a time is exactly repeatable.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..cpus import usable_cores
from ..preprocess import PixelSpec
from .backends import classification_head, head_input

logger = logging.getLogger(__name__)

# Bump when the export or the quantization changes: old cache entries are then ignored.
RECIPE = "onnx-opset17-int8-dynamic-matmul-per-channel-v2"
# The weights (single file or shards with their index), the config and the processor config.
FINGERPRINT_PATTERNS = ("config.json", "preprocessor_config.json", "model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin")


class FastPathUnavailable(RuntimeError):
    """The fast backend cannot be used here (package missing, export failed); callers fall back."""


def default_cache() -> Path:
    """$XDG_CACHE_HOME/pneumonia-vit, else ~/.cache/pneumonia-vit (the platform's convention)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pneumonia-vit"


def fingerprint(model_dir: str | os.PathLike) -> str:
    """Hash of the model's weight and config files, the recipe and the quantizer's version."""
    import onnxruntime

    digest = hashlib.sha256(f"{RECIPE}|onnxruntime {onnxruntime.__version__}".encode())
    paths = sorted({path for pattern in FINGERPRINT_PATTERNS for path in Path(model_dir).glob(pattern) if path.is_file()})
    if not any(path.name.startswith(("model", "pytorch_model")) for path in paths):
        raise FastPathUnavailable(f"{model_dir}: no model weights (model*.safetensors or pytorch_model*.bin) to fingerprint")
    for path in paths:
        digest.update(f"|{path.name}|".encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()[:24]


class _LogitsAndFeatures(torch.nn.Module):
    """The exported graph: logits, and the classification head's input where the model has one (`backends.forward`)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        if classification_head(self.model) is None:
            return (self.model(pixel_values=pixel_values).logits,)
        with head_input(self.model) as captured:
            logits = self.model(pixel_values=pixel_values).logits
        return logits, captured[0]


def export_onnx(model, spec: PixelSpec, path: Path) -> None:
    """Exports a transformers image classifier to an fp32 ONNX graph with a dynamic batch axis."""
    wrapper = _LogitsAndFeatures(model.eval())
    example = torch.zeros(1, 3, spec.size, spec.size)
    outputs = ["logits"] if classification_head(model) is None else ["logits", "features"]
    names = {"input_names": ["pixel_values"], "output_names": outputs}
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings about the exporter itself
        try:  # the TorchScript exporter first: the dynamo one needs onnxscript
            torch.onnx.export(wrapper, (example,), str(path), **names, opset_version=17, dynamo=False,
                              dynamic_axes={name: {0: "batch"} for name in ["pixel_values", *outputs]})
        except Exception as error:  # a torch without the TorchScript exporter
            logger.info("TorchScript ONNX export failed (%s); trying the dynamo exporter", error)
            torch.onnx.export(wrapper, (example,), str(path), **names, dynamo=True, external_data=False,
                              dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch")}})


def quantize_int8(source: Path, target: Path, per_channel: bool = True) -> None:
    """Dynamic int8 quantization of the MatMul weights (not the patch convolution, not the Gemm head)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.setLevel(logging.ERROR)  # the quantizer logs every tensor on the root logger
    try:
        quantize_dynamic(
            source, target, op_types_to_quantize=["MatMul"], per_channel=per_channel,
            weight_type=QuantType.QInt8, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        root_logger.setLevel(level)


def export_int8(model, spec: PixelSpec, target: Path) -> None:
    """Exports `model` to ONNX and quantizes it into `target`, written atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".export-") as work:
        fp32_path, int8_path = Path(work) / "model.fp32.onnx", Path(work) / "model.int8.onnx"
        export_onnx(model, spec, fp32_path)
        quantize_int8(fp32_path, int8_path)
        os.replace(int8_path, target)  # atomic: a concurrent loader sees no file or a whole one


@dataclass
class OnnxBackend:
    """An ONNX Runtime session over the int8 model; call it with `pixel_array` output."""

    name = "onnxruntime-int8"
    path: Path
    threads: int
    startup: dict = field(default_factory=dict)  # seconds spent on export/quantize/session, cache hit

    def __post_init__(self):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # No busy-waiting after each run (ONNX Runtime's default): in the app the idle threads would burn a core
        # between requests that the web server needs (benchmarks/api_throughput.py).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.output_names = [output.name for output in self.session.get_outputs()]

    def run(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits (N, classes) and features (N, hidden; None where the graph has no classification head)."""
        values = self.session.run(None, {"pixel_values": np.ascontiguousarray(pixels, dtype=np.float32)})
        outputs = dict(zip(self.output_names, values))
        return outputs["logits"], outputs.get("features")


def load_fast_model(model_dir: str | os.PathLike, spec: PixelSpec, load_torch_model: Callable[[], object],
                    threads: int | None = None, cache: str | os.PathLike | None = None) -> OnnxBackend:
    """The int8 ONNX model for the weights in `model_dir`, exported from `load_torch_model()` on a cache miss into
    `cache` (default: `default_cache()`), run with `threads` intra-op threads (default: every core this process may
    use). Raises FastPathUnavailable when onnxruntime or onnx is missing or the export fails."""
    try:
        import onnx  # noqa: F401  (the quantizer needs it)
        import onnxruntime  # noqa: F401
    except ImportError as error:
        raise FastPathUnavailable(f"{error.name} is not installed (pip install onnxruntime onnx)") from error
    started = time.perf_counter()
    key = fingerprint(model_dir)
    root = Path(cache) if cache is not None else default_cache()
    target = root / key / "model.int8.onnx"
    startup = {"cache_hit": target.is_file(), "fingerprint_s": time.perf_counter() - started, "artefact": str(target)}
    if not startup["cache_hit"]:
        begin = time.perf_counter()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=target.parent).close()
        except OSError as error:
            # A read-only or missing home: keep the artefact in a temporary folder for this process.
            logger.warning("cannot write the fast-path cache %s (%s); exporting into a temporary folder",
                           target.parent, error)
            target = Path(tempfile.mkdtemp(prefix="pneumonia-vit-")) / key / "model.int8.onnx"
        try:
            export_int8(load_torch_model(), spec, target)
        except Exception as error:
            raise FastPathUnavailable(f"ONNX export/quantization failed: {type(error).__name__}: {error}") from error
        startup["export_quantize_s"] = time.perf_counter() - begin
        startup["artefact"] = str(target)
        logger.info("exported the int8 ONNX model to %s in %.1f s", target, startup["export_quantize_s"])
    begin = time.perf_counter()
    try:
        model = OnnxBackend(target, threads or usable_cores())
    except Exception as error:
        if not startup["cache_hit"]:
            raise FastPathUnavailable(f"ONNX Runtime cannot load the exported model: {error}") from error
        # A damaged cache entry (a full disk, a copied cache): export again, once.
        logger.warning("cached fast model %s is unreadable (%s); exporting it again", target, error)
        target.unlink(missing_ok=True)
        return load_fast_model(model_dir, spec, load_torch_model, threads, cache)
    startup["session_s"] = time.perf_counter() - begin
    startup["total_s"] = time.perf_counter() - started
    model.startup = startup
    return model
