"""What every benchmark shares: its options, the models and images it measures, timing that alternates the
candidates, and results files that record the machine and how busy it was."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no per-load progress bars and notices
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

RESULTS = REPO / "benchmarks" / "results"
BUNDLED_MODEL = REPO / "models" / "pneumonia-vit-tiny"
SHARED_DATA = Path(os.environ.get("PNEUMONIA_DATA_ROOT", REPO.parent / "shared" / "data"))
SCRATCH = Path(os.environ.get("PNEUMONIA_VIT_BENCH_SCRATCH", Path.home() / ".cache" / "pneumonia-vit-bench"))

# The bundled model's architecture (configs/vit_tiny_cpu.yaml), for runs before it is trained.
BUNDLED_CONFIG = dict(image_size=128, patch_size=16, hidden_size=192, num_hidden_layers=6, num_attention_heads=3,
                      intermediate_size=768)
VIT_BASE = "ViT-B/16 (random weights)"

PATH_OPTIONS = {  # option: (default, help)
    "model": (None, "model folder (default: the bundled one, or a random model of its architecture until it exists)"),
    "data_dir": (REPO / "data" / "chest_xray_prepared", "prepared data (data_prep/prepare.py): train/, validation/, test/"),
    "originals": (SHARED_DATA / "chest_xray_originals", "the full-resolution originals: test/ and val/"),
    "adult_dir": (SHARED_DATA / "adult_cxr_224", "adult chest X-rays and their provenance.csv"),
}


def options(doc: str, *paths: str) -> argparse.ArgumentParser:
    """--quick, --output and the named PATH_OPTIONS; a benchmark adds its own."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: fewer images and iterations; results go to <name>-quick.*")
    parser.add_argument("--output", type=Path, help="write OUTPUT.json and OUTPUT.md (default benchmarks/results/<name>)")
    for name in paths:
        default, help_text = PATH_OPTIONS[name]
        parser.add_argument(f"--{name}", type=Path, default=default, help=help_text)
    return parser


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


def bundled_dir(requested: str | Path | None = None) -> tuple[Path, bool]:
    """(folder, trained): the requested or bundled model, or a random model of its architecture until it exists."""
    if requested:
        return Path(requested), True
    if (BUNDLED_MODEL / "config.json").is_file():
        return BUNDLED_MODEL, True
    print(f"note: {BUNDLED_MODEL} does not exist yet: timing a random model of its architecture", flush=True)
    return make_random_model(SCRATCH / "vit-tiny-128-random", **BUNDLED_CONFIG), False


def models(requested: Path | None, vit_base: bool) -> list[tuple[str, Path, bool]]:
    """(name, folder, trained): the bundled model (or --model) and, with `vit_base`, ViT-B/16 at 224 px."""
    folder, trained = bundled_dir(requested)
    chosen = [("bundled" + ("" if trained else " (random weights)"), folder, trained)]
    if vit_base:
        chosen.append((VIT_BASE, make_random_model(SCRATCH / "vit-base-patch16-224-random"), False))
    return chosen


def labelled_files(folder: Path) -> list[tuple[Path, int]]:
    """(path, label) of every image below folder/{NORMAL,PNEUMONIA}, sorted."""
    from pneumonia_vit.images import LABELS
    from pneumonia_vit.ood.corpus import image_files

    files = [(path, label) for label, name in enumerate(LABELS) for path in image_files(folder / name)]
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
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"n": len(ordered), "p50_ms": 1000 * statistics.median(ordered), "p95_ms": 1000 * p95,
            "mean_ms": 1000 * statistics.fmean(ordered)}


def interleaved(candidates: dict[str, Callable[[int], object]], iterations: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds of each of `iterations` calls of each candidate, round-robin, so that load changes hit all of
    them alike. Each call gets the iteration number (to cycle through inputs)."""
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


def status_mib(field: str, pid: int | str = "self") -> float | None:
    """A memory field of /proc/<pid>/status (VmRSS: resident now, VmHWM: peak) in MiB; None off Linux."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


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
    import torch

    def version(package):
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    try:
        cpu_model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu_model = platform.processor()
    return {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "cpu_model": cpu_model, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            **{package: version(package) for package in ("transformers", "numpy", "pillow", "onnxruntime")},
            "load_average_at_start": MACHINE_AT_START["load_average"],
            "cpu_busy_share_at_start": MACHINE_AT_START["cpu_busy_share"]}


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(value):
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def section(title: str, header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A titled table; nothing where there are no rows."""
    return f"### {title}\n\n" + markdown_table(header, rows) if rows else ""


def verdict(claim: str, passed: bool) -> str:
    return f"{claim} -> {'PASS' if passed else 'FAIL'}"


def goals(verdicts: Sequence[str]) -> str:
    return "### Goals\n\n" + "\n".join(f"- {line}" for line in verdicts)


def write_results(name: str, quick: bool, data: dict, markdown: str, output: Path | None = None) -> Path:
    """OUTPUT.json and OUTPUT.md (default benchmarks/results/<name>, <name>-quick for --quick); prints the markdown."""
    stem = Path(output).with_suffix("") if output else RESULTS / (f"{name}-quick" if quick else name)
    stem.parent.mkdir(parents=True, exist_ok=True)
    env = data.setdefault("environment", environment())
    load = os.getloadavg()
    data["load_average_at_end"] = list(load)
    busy = env["cpu_busy_share_at_start"]
    busy_text = "unknown" if busy is None else f"{100 * busy:.0f}%"
    header = (f"<!-- {' '.join(sys.argv)} | {env['cpu_model']}, {env['cpus']} CPUs | torch {env['torch']}, "
              f"onnxruntime {env['onnxruntime']}, transformers {env['transformers']} | CPU busy before the run "
              f"{busy_text}, load average {env['load_average_at_start'][0]:.1f} at start, {load[0]:.1f} at end -->\n")
    Path(f"{stem}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    Path(f"{stem}.md").write_text(header + markdown + "\n")
    print("\n" + header + markdown, flush=True)
    cpus = env["cpus"] or 1
    # The benchmark itself keeps about `cpus` threads busy; more than that at the end means company.
    if (busy is not None and busy > 0.1) or load[0] > 1.25 * cpus + 1:
        print(f"WARNING: the machine was busy (CPU busy before the run {busy_text}, load average {load[0]:.1f} "
              f"at the end on {env['cpus']} CPUs): timings are noisy; rerun on a quiet machine.", flush=True)
    print(f"wrote {stem}.json and {stem}.md", flush=True)
    return Path(f"{stem}.md")
