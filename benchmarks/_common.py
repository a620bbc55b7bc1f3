"""Shared helpers of the benchmark scripts: timing, test models, data lists, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no per-load progress bars and notices
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

RESULTS = REPO / "benchmarks" / "results"
BUNDLED_MODEL = REPO / "models" / "pneumonia-vit-tiny"
PREPARED_TEST = REPO / "data" / "chest_xray_prepared" / "test"
SHARED_DATA = Path(os.environ.get("PNEUMONIA_DATA_ROOT", REPO.parent / "shared" / "data"))
ORIGINALS = SHARED_DATA / "chest_xray_originals"
SCRATCH = Path(os.environ.get("PNEUMONIA_VIT_BENCH_SCRATCH", Path.home() / ".cache" / "pneumonia-vit-bench"))

# The bundled model's architecture (configs/vit_tiny_cpu.yaml), for runs before it is trained.
BUNDLED_CONFIG = dict(image_size=128, patch_size=16, hidden_size=192, num_hidden_layers=6, num_attention_heads=3,
                      intermediate_size=768)


def make_random_model(folder: Path, **config) -> Path:
    """A randomly initialised ViT classifier saved like a trained one (weights, processor, threshold).

    Seeded, so the same weights (and the same fast-path cache entry) come back on every run.
    Without arguments: ViT-B/16 at 224 px, the size of google/vit-base-patch16-224.
    """
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    from pneumonia_vit.images import LABELS
    from pneumonia_vit.preprocess import PixelSpec

    torch.manual_seed(0)
    vit_config = ViTConfig(num_labels=2, id2label=dict(enumerate(LABELS)),
                           label2id={label: i for i, label in enumerate(LABELS)}, **config)
    vit_config.decision_threshold = 0.5
    partial = folder.with_name(folder.name + ".partial")
    ViTForImageClassification(vit_config).save_pretrained(partial)
    PixelSpec(size=vit_config.image_size).processor().save_pretrained(partial)
    partial.rename(folder)
    return folder


def vit_base_dir() -> Path:
    return make_random_model(SCRATCH / "vit-base-patch16-224-random")


def bundled_dir(requested: str | None = None) -> tuple[Path, bool]:
    """(folder, trained): the bundled model, or a random model of its architecture until it exists."""
    if requested:
        return Path(requested), True
    if (BUNDLED_MODEL / "config.json").is_file():
        return BUNDLED_MODEL, True
    print(f"note: {BUNDLED_MODEL} does not exist yet: timing a random model of its architecture", flush=True)
    return make_random_model(SCRATCH / "vit-tiny-128-random", **BUNDLED_CONFIG), False


def labelled_files(folder: Path) -> list[tuple[Path, int]]:
    """(path, label) of every image below folder/{NORMAL,PNEUMONIA}, sorted."""
    from pneumonia_vit.images import IMAGE_SUFFIXES, LABELS

    files = []
    for label, name in enumerate(LABELS):
        files += [(path, label) for path in sorted((folder / name).iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise FileNotFoundError(f"no images in {folder}/NORMAL or {folder}/PNEUMONIA")
    return files


def spread(items: Sequence, count: int) -> list:
    """`count` items taken evenly across `items` (both classes, all sizes)."""
    if count >= len(items):
        return list(items)
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


def percentiles(seconds: Sequence[float]) -> dict:
    ordered = sorted(seconds)

    def at(q):
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {"n": len(ordered), "p50_ms": 1000 * statistics.median(ordered), "p95_ms": 1000 * at(0.95),
            "mean_ms": 1000 * statistics.fmean(ordered)}


def interleaved(candidates: dict[str, Callable[[int], object]], iterations: int, warmup: int = 2) -> dict[str, list[float]]:
    """Times each candidate `iterations` times, round-robin, so load changes hit all of them alike.

    Each call gets the iteration number (to cycle through inputs)."""
    for run in candidates.values():
        for i in range(warmup):
            run(i)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for i in range(iterations):
        for name, run in candidates.items():
            start = time.perf_counter()
            run(i)
            times[name].append(time.perf_counter() - start)
    return times


def _cpu_busy_share(seconds: float = 0.5) -> float | None:
    """Share of all cores' time spent busy over `seconds` (from /proc/stat; None where there is none).
    Unlike the load average it ignores tasks that only wait for I/O, which keep the load average of
    these otherwise idle machines near 1."""

    def sample():
        fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, all

    try:
        idle_before, total_before = sample()
        time.sleep(seconds)
        idle_after, total_after = sample()
    except (OSError, ValueError):
        return None
    return 1 - (idle_after - idle_before) / max(1, total_after - total_before)


# Measured on import, before the benchmark does any work: how busy other programs keep the machine.
MACHINE_AT_START = {"load_average": list(os.getloadavg()), "cpu_busy_share": _cpu_busy_share()}


def environment() -> dict:
    import numpy
    import PIL
    import torch
    import transformers

    info = {
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__, "numpy": numpy.__version__, "pillow": PIL.__version__,
        "load_average_at_start": MACHINE_AT_START["load_average"],
        "cpu_busy_share_at_start": MACHINE_AT_START["cpu_busy_share"],
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = None
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(value):
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, quick: bool, data: dict, markdown: str) -> Path:
    """benchmarks/results/<name>.json and .md (<name>-quick.* for --quick runs); prints the markdown."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-quick" if quick else name
    env = data.setdefault("environment", environment())
    load = os.getloadavg()
    data["load_average_at_end"] = list(load)
    busy = env["cpu_busy_share_at_start"]
    busy_text = "unknown" if busy is None else f"{100 * busy:.0f}%"
    header = (f"<!-- {' '.join(sys.argv)} | {env['cpu_model']}, {env['cpus']} CPUs | torch {env['torch']}, "
              f"onnxruntime {env['onnxruntime']}, transformers {env['transformers']} | CPU busy before the run "
              f"{busy_text}, load average {env['load_average_at_start'][0]:.1f} at start, {load[0]:.1f} at end -->\n")
    (RESULTS / f"{stem}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    (RESULTS / f"{stem}.md").write_text(header + markdown + "\n")
    print("\n" + header + markdown, flush=True)
    cpus = env["cpus"] or 1
    # The benchmark itself keeps about `cpus` threads busy; more than that at the end means company.
    if (busy is not None and busy > 0.1) or load[0] > 1.25 * cpus + 1:
        print(f"WARNING: the machine was busy (CPU busy before the run {busy_text}, load average {load[0]:.1f} "
              f"at the end on {env['cpus']} CPUs): timings are noisy; rerun on a quiet machine.", flush=True)
    print(f"wrote {RESULTS / (stem + '.json')} and {RESULTS / (stem + '.md')}", flush=True)
    return RESULTS / f"{stem}.md"
