"""What every benchmark shares: its options, the models, images and app clients it measures, timing that
alternates the candidates, and results files that record the machine and how busy it was."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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

# /predict refuses the adult example as out of domain: the load on the app is the children's films.
EXAMPLES = sorted(path for path in (REPO / "examples").glob("*.jpeg") if not path.name.startswith("adult"))
DROPPED = ("RemoteProtocolError", "ReadError", "ConnectError", "ConnectionReset", "RemoteDisconnected", "peer closed")
VIT_BASE = "ViT-B/16 (random weights)"

PATH_OPTIONS = {  # option: (default, help)
    "model": (BUNDLED_MODEL, "model folder (default: the bundled one)"),
    "data_dir": (REPO / "data" / "chest_xray_prepared", "prepared data (data_prep/prepare.py): train/, validation/..."),
    "originals": (SHARED_DATA / "chest_xray_originals", "the full-resolution originals: test/ and val/"),
    "adult_dir": (SHARED_DATA / "adult_cxr_224", "adult chest X-rays and their provenance.csv"),
}


def options(doc: str, *paths: str) -> argparse.ArgumentParser:
    """--quick, --output and the named PATH_OPTIONS; a benchmark adds its own."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: fewer images and iterations; results go to <name>-quick.*")
    parser.add_argument("--output", type=Path, help="write OUTPUT.json and .md (default benchmarks/results/<name>)")
    for name in paths:
        default, help_text = PATH_OPTIONS[name]
        parser.add_argument(f"--{name}", type=Path, default=default, help=help_text)
    return parser


def models(requested: Path, vit_base: bool) -> list[tuple[str, Path]]:
    """(name, folder): the bundled model (or --model) and, with `vit_base`, a seeded random ViT-B/16 at 224 px (the
    size of google/vit-base-patch16-224; the same weights, and fast-path cache entry, on every run)."""
    folder = SCRATCH / "vit-base-patch16-224-random"
    if vit_base and not (folder / "model.safetensors").is_file():
        import torch
        from transformers import ViTConfig, ViTForImageClassification

        from pneumonia_vit.images import LABELS
        from pneumonia_vit.preprocess import PixelSpec

        torch.manual_seed(0)
        config = ViTConfig(num_labels=2, id2label=dict(enumerate(LABELS)),
                           label2id={label: i for i, label in enumerate(LABELS)}, decision_threshold=0.5)
        partial = folder.with_name(folder.name + ".partial")
        ViTForImageClassification(config).save_pretrained(partial)
        PixelSpec(size=config.image_size).processor().save_pretrained(partial)
        partial.rename(folder)
    return [("bundled", requested)] + ([(VIT_BASE, folder)] if vit_base else [])


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


def interleaved(candidates: dict[str, Callable[[int], object]], iterations: int, warmup: int = 2) -> dict[str, list]:
    """Seconds of each of `iterations` calls of each candidate, round-robin, so that load changes hit all of them
    alike. Each call gets the iteration number (to cycle through inputs)."""
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


def client(url: str):
    """A gradio_client Client of a local app. Without ssl_verify=False it builds a TLS context, CA bundle included,
    for each HTTP request of a call (tens of ms of CPU), and the clients, not the app, would be measured."""
    from gradio_client import Client

    return Client(url, verbose=False, ssl_verify=False)


def error_kind(text: str) -> str:
    """busy (the app's refusal), queue full (gradio's), dropped (the connection closed mid-answer) or other (such as
    gradio_client's 5 s HTTP timeout on the upload or the queue join)."""
    if "busy" in text.lower():
        return "busy"
    if "queue is full" in text.lower():
        return "queue full"
    return "dropped" if any(name in text for name in DROPPED) else "other"


@dataclass
class Tally:
    """What calls from many client threads got (list.append is atomic: no lock): answers as (endpoint, seconds),
    errors as (kind, message, seconds; None for a client that failed before its timed calls)."""

    answers: list[tuple[str, float]] = field(default_factory=list)
    errors: list[tuple[str, str, float | None]] = field(default_factory=list)

    def summary(self, wall: float) -> dict:
        latencies = [seconds for _, seconds in self.answers]
        kinds = Counter(kind for kind, _, _ in self.errors)
        error_seconds = [seconds for _, _, seconds in self.errors if seconds is not None]
        return {
            "answered": len(latencies), "errors": dict(kinds), "error_count": len(self.errors),
            "error_examples": {kind: sorted({text for k, text, _ in self.errors if k == kind})[:3] for kind in kinds},
            "wall_s": wall, "images_per_s": len(latencies) / wall if wall > 0 else float("nan"),
            **(percentiles(latencies) if latencies else {"p50_ms": float("nan"), "p95_ms": float("nan")}),
            "by_endpoint": {endpoint: percentiles([seconds for e, seconds in self.answers if e == endpoint])
                            for endpoint in sorted({endpoint for endpoint, _ in self.answers})},
            "slowest_refusal_ms": 1000 * max(error_seconds) if error_seconds else None,
        }


def run_clients(url: str, clients: int, requests: int, tally: Tally, analyze_every: int = 0, warmup: int = 0) -> float:
    """`clients` threads, each with its own Client (its own session, as a browser's) and `warmup` calls, released
    together to send `requests` calls in a row, one in `analyze_every` to /analyze (the page's, with the heatmap), the
    rest to /predict; returns the seconds from the release to the last answer."""
    from gradio_client import handle_file

    release, ready = threading.Event(), threading.Semaphore(0)

    def call(app, index: int, endpoint: str = "/predict"):
        value = app.predict(handle_file(str(EXAMPLES[index % len(EXAMPLES)])), api_name=endpoint)
        if endpoint == "/predict" and value.get("label") not in ("NORMAL", "PNEUMONIA"):
            raise ValueError(f"unexpected answer {value!r}")

    def thread(index: int) -> None:
        try:
            app = client(url)
            for i in range(warmup):
                call(app, index + i)
        except Exception as error:  # noqa: BLE001
            tally.errors.append(("client setup", f"{type(error).__name__}: {error}"[:300], None))
            return
        finally:
            ready.release()
        release.wait()
        for i in range(requests):
            endpoint = "/analyze" if analyze_every and (index + i) % analyze_every == 0 else "/predict"
            sent = time.perf_counter()
            try:
                call(app, index + i, endpoint)
            except Exception as error:  # noqa: BLE001
                text = f"{type(error).__name__}: {error}"
                tally.errors.append((error_kind(text), text[:300], time.perf_counter() - sent))
                continue
            tally.answers.append((endpoint, time.perf_counter() - sent))

    threads = [threading.Thread(target=thread, args=(index,), daemon=True) for index in range(clients)]
    for started in threads:
        started.start()
    for _ in threads:
        ready.acquire()
    begin = time.perf_counter()
    release.set()
    for started in threads:
        started.join()
    return time.perf_counter() - begin


def status_mib(field: str, pid: int | str = "self") -> float:
    """A memory field of /proc/<pid>/status (VmRSS: resident now, VmHWM: peak) in MiB."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return int(next(line for line in lines if line.startswith(field + ":")).split()[1]) / 1024


def _cpu_busy_share(seconds: float = 0.5) -> float:
    """Share of all cores' time spent busy over `seconds` (/proc/stat). Unlike the load average it ignores tasks that
    only wait for I/O, which keep the load average of these otherwise idle machines near 1."""

    def sample():
        fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, all

    idle_before, total_before = sample()
    time.sleep(seconds)
    idle_after, total_after = sample()
    return 1 - (idle_after - idle_before) / max(1, total_after - total_before)


# Measured on import, before the benchmark does any work: how busy other programs keep the machine.
MACHINE_AT_START = {"load_average": list(os.getloadavg()), "cpu_busy_share": _cpu_busy_share()}


def environment() -> dict:
    import torch

    cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor())
    return {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "cpu_model": cpu_model, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            **{package: metadata.version(package) for package in ("transformers", "numpy", "pillow", "onnxruntime")},
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


def section(title: str, header: Sequence[str], rows: Sequence[Sequence], after: str = "") -> str:
    """A titled table, then `after`; nothing where there are no rows."""
    return f"### {title}\n\n" + markdown_table(header, rows) + (after and "\n\n" + after) if rows else ""


def verdict(claim: str, passed: bool) -> str:
    return f"{claim} -> {'PASS' if passed else 'FAIL'}"


def write_results(name: str, args, data: dict, sections: Sequence[str], verdicts: Sequence[str] = ()) -> None:
    """OUTPUT.json and OUTPUT.md (default benchmarks/results/<name>, <name>-quick with --quick): the sections and the
    goals' verdicts under a header that names the command, the machine and how busy it was; prints the markdown."""
    stem = Path(args.output).with_suffix("") if args.output else RESULTS / (f"{name}-quick" if args.quick else name)
    stem.parent.mkdir(parents=True, exist_ok=True)
    goals = ["### Goals\n\n" + "\n".join(f"- {line}" for line in verdicts)] if verdicts else []
    if verdicts:
        data["verdicts"] = list(verdicts)
    markdown = "\n\n".join(filter(None, [*sections, *goals]))
    env = data.setdefault("environment", environment())
    load = os.getloadavg()
    data["load_average_at_end"] = list(load)
    busy = env["cpu_busy_share_at_start"]
    busy_text = f"{100 * busy:.0f}%"
    header = (f"<!-- {' '.join(sys.argv)} | {env['cpu_model']}, {env['cpus']} CPUs | torch {env['torch']}, "
              f"onnxruntime {env['onnxruntime']}, transformers {env['transformers']} | CPU busy before the run "
              f"{busy_text}, load average {env['load_average_at_start'][0]:.1f} at start, {load[0]:.1f} at end -->\n")
    Path(f"{stem}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    Path(f"{stem}.md").write_text(header + markdown + "\n")
    print("\n" + header + markdown, flush=True)
    # The benchmark itself keeps about `cpus` threads busy; more than that at the end means company.
    if busy > 0.1 or load[0] > 1.25 * (env["cpus"] or 1) + 1:
        print(f"WARNING: the machine was busy (CPU busy before the run {busy_text}, load average {load[0]:.1f} "
              f"at the end on {env['cpus']} CPUs): timings are noisy; rerun on a quiet machine.", flush=True)
    print(f"wrote {stem}.json and {stem}.md", flush=True)
