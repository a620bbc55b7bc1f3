"""Data preparation throughput on the full-resolution originals (the test and val splits of --originals; --quick: 64
of them, 1 round): the naive Pillow loop against data_prep's `convert_all` as `prepare()` runs it (threads), the same
`_convert` on processes and on 1 thread; the best of alternating rounds counts. Also the output's agreement with the
naive loop and with the same conversion decoding at full size, and the cost of the formats data_prep could cache.
"""

from __future__ import annotations

import io
import sys
import time
import zlib
from multiprocessing import Pool

import numpy as np
from PIL import Image

from benchmarks.harness import markdown_table, options, section, spread, verdict, write_results
from data_prep.prepare import PREPARED_FORMAT, _convert, convert_all
from pneumonia_vit.cpus import cpu_seconds, usable_cores
from pneumonia_vit.images import load_xray
from pneumonia_vit.preprocess import resize_gray

SIZE = 224


def prepared_on_processes(paths: list[str], workers: int) -> list[dict]:
    with Pool(workers) as pool:
        return list(pool.imap(_convert, [(p, SIZE) for p in paths], chunksize=8))


def cached_formats(images: list[np.ndarray]) -> dict:
    """Encoding and decoding cost and size per image of the formats data_prep could cache."""
    candidates = {
        "PGM (data_prep now)": (PREPARED_FORMAT, {}),
        "BMP": ("BMP", {}),
        "PNG, zlib level 1, RLE strategy (data_prep before)": ("PNG", {"compress_level": 1,
                                                                      "compress_type": zlib.Z_RLE}),
        "PNG, Pillow's default (level 6)": ("PNG", {}),
    }
    results = {}
    for name, (fmt, settings) in candidates.items():
        start = time.perf_counter()
        encoded = []
        for array in images:
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format=fmt, **settings)
            encoded.append(buffer.getvalue())
        encode_s = time.perf_counter() - start
        start = time.perf_counter()
        decoded = [np.asarray(Image.open(io.BytesIO(data))) for data in encoded]
        decode_s = time.perf_counter() - start
        if not all(np.array_equal(a, b) for a, b in zip(images, decoded)):
            raise SystemExit(f"{name} did not give the same pixels back")
        results[name] = {"encode_ms": 1000 * encode_s / len(images), "decode_ms": 1000 * decode_s / len(images),
                         "kib": float(np.mean([len(data) for data in encoded])) / 1024}
    return results


def agreement(ours: list[np.ndarray], reference: list[np.ndarray]) -> dict:
    error = np.stack(ours).astype(np.float64) - np.stack(reference).astype(np.float64)
    mse_per_image = (error ** 2).mean(axis=(1, 2))

    def psnr(mse):
        return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))

    return {"psnr_db": psnr(mse_per_image.mean()), "worst_image_psnr_db": psnr(mse_per_image.max()),
            "mean_abs_diff": float(np.abs(error).mean()), "max_abs_diff": float(np.abs(error).max()),
            "p99_abs_diff": float(np.quantile(np.abs(error), 0.99))}


def main(argv=None) -> int:
    args = options(__doc__, "originals").parse_args(argv)
    workers = usable_cores()
    paths = sorted(str(p) for split in ("test", "val") for p in (args.originals / split).rglob("*.jpeg"))
    if not paths:
        raise SystemExit(f"no originals under {args.originals}/test or {args.originals}/val")
    if args.quick:
        paths = spread(paths, 64)
    rounds = 1 if args.quick else 5
    print(f"{len(paths)} originals, {rounds} round(s), {workers} worker(s)", flush=True)

    candidates = {
        "naive": lambda: [np.asarray(Image.open(p).convert("L").resize((SIZE, SIZE))) for p in paths],
        "data_prep": lambda: list(convert_all(paths, SIZE, workers)),
        "data_prep_processes": lambda: prepared_on_processes(paths, workers),
        "data_prep_1_thread": lambda: list(convert_all(paths, SIZE, 1)),
    }
    times, cpu, outputs = {name: [] for name in candidates}, {name: [] for name in candidates}, {}
    for _ in range(rounds):
        for name, run in candidates.items():
            cpu_start, start = cpu_seconds(), time.perf_counter()
            outputs[name] = run()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(cpu_seconds() - cpu_start)
            print(f"{name}: {len(paths) / times[name][-1]:.1f} images/s, "
                  f"{1000 * cpu[name][-1] / len(paths):.2f} CPU ms per image", flush=True)

    failures = [r["error"] for r in outputs["data_prep"] if "error" in r]
    if failures:
        raise SystemExit(f"data_prep could not read {len(failures)} file(s): {failures[:3]}")
    ours = [np.asarray(Image.open(io.BytesIO(r["encoded"]))) for r in outputs["data_prep"]]
    formats = cached_formats(ours)
    cpu_ms = {name: 1000 * min(c) / len(paths) for name, c in cpu.items()}
    throughput = {name: len(paths) / min(t) for name, t in times.items()}
    vs_naive = agreement(ours, outputs["naive"])
    vs_no_draft = agreement(ours, [np.asarray(resize_gray(load_xray(p), SIZE)) for p in paths])
    ratio = throughput["data_prep"] / throughput["naive"]
    data = {"images": len(paths), "rounds": rounds, "workers": workers, "seconds": times, "cpu_seconds": cpu,
            "images_per_s": throughput, "cpu_ms_per_image": cpu_ms, "agreement_vs_naive": vs_naive,
            "agreement_vs_same_without_draft": vs_no_draft, "cached_formats": formats}
    same = ["(same output)", "", ""]
    rows = [[label, throughput[name], f"{throughput[name] / throughput['naive']:.2f}x", cpu_ms[name], *cells]
            for name, label, cells in (
                ("naive", "naive loop (1 process, nothing saved)", ["-", "-", "-"]),
                ("data_prep", f"data_prep, {workers} threads (hash + draft decode + resize + PGM)",
                 [f"{vs_naive['psnr_db']:.1f}", f"{vs_naive['mean_abs_diff']:.2f}", f"{vs_naive['max_abs_diff']:.0f}"]),
                ("data_prep_processes", f"the same on {workers} processes", same),
                ("data_prep_1_thread", "the same on 1 thread", same))]
    naive_ms, ours_ms = cpu_ms["naive"], cpu_ms["data_prep_1_thread"]
    write_results("data_prep", args, data, [
        section(f"Data preparation: {len(paths)} full-resolution originals -> {SIZE} px grayscale",
                ["path", "images/s", "vs naive", "CPU ms per image", "PSNR vs naive (dB)",
                 "mean abs diff (grey levels)", "max abs diff"], rows,
                f"Draft decoding's own effect (data_prep vs the same conversion decoding at full size): PSNR "
                f"{vs_no_draft['psnr_db']:.1f} dB (worst image {vs_no_draft['worst_image_psnr_db']:.1f} dB), mean abs "
                f"diff {vs_no_draft['mean_abs_diff']:.2f}, 99th percentile {vs_no_draft['p99_abs_diff']:.0f}, max "
                f"{vs_no_draft['max_abs_diff']:.0f} grey levels. Against the naive loop the difference is mostly the "
                "resampling filter: naive `resize` defaults to bicubic, data_prep uses bilinear with antialiasing like "
                f"ViTImageProcessor (worst image {vs_naive['worst_image_psnr_db']:.1f} dB).\n\n"
                f"Cached format (the {len(ours)} prepared images; every format holds the same pixels; decoding is paid "
                "again at every training epoch):\n\n"
                + markdown_table(["format", "encode ms per image", "decode ms per image", "KiB per image"],
                                 [[name, f["encode_ms"], f["decode_ms"], f["kib"]] for name, f in formats.items()])
                + f"\n\n- {verdict(f'Goal: data_prep >= 5x the naive loop: {ratio:.2f}x', ratio >= 5)}. CPU time per "
                f"image: naive {naive_ms:.2f} ms, data_prep {ours_ms:.2f} ms ({naive_ms / ours_ms:.2f}x less); with "
                f"{workers} fully used cores the ceiling is about {workers * naive_ms / ours_ms:.1f}x."),
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
