"""What the training input pipeline costs: train steps/s of the bundled model's architecture (batch 32, AdamW) fed
by the real pipeline (`BatchTransform` with augmentation over the prepared train split, in a shuffled DataLoader as
Trainer builds it: 0 workers, and 1), by a decode-once cache (the same augmentations, checked), and from batches
already in memory (the reference), in alternating blocks of steps. --quick: 384 images, shorter blocks, 1 round.
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image
from transformers import ViTConfig

from benchmarks.harness import BUNDLED_MODEL, interleaved, options, section, verdict, write_results
from pneumonia_vit.images import load_xray
from pneumonia_vit.preprocess import PixelSpec, pixel_values
from pneumonia_vit.training.data import Augmentation, BatchTransform, collate, load_splits, with_sample_index

BATCH = 32
SEED = 42
MEMORY = "memory (reference)"
TRAINER_DEFAULT = "pipeline, 0 workers (Trainer default)"


class CachedDecode(torch.utils.data.Dataset):
    """The train split decoded once; per access what `BatchTransform` does after decoding (epoch 0), so it draws
    the same augmentations."""

    def __init__(self, split, spec: PixelSpec, augmentation: Augmentation, seed: int):
        self.spec, self.augmentation, self.seed = spec, augmentation, seed
        self.labels = torch.tensor(split["label"])
        self.pixels = np.stack([np.asarray(load_xray(row["image"])) for row in split])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        image = Image.fromarray(self.pixels[index], mode="L")
        image = self.augmentation(image, self.spec.size, np.random.default_rng((self.seed, 0, index)))
        return {"pixel_values": pixel_values([image], self.spec)[0], "labels": self.labels[index]}


def loader(dataset, workers: int, seed: int = 42):
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, collate_fn=collate, num_workers=workers,
                                       generator=generator, drop_last=True, persistent_workers=workers > 0)


def endless(make_iterator):
    while True:
        yield from make_iterator()


def trainer_step(config):
    """One AdamW step of a fresh model of this architecture, as a function of the batch."""
    from transformers import ViTForImageClassification

    torch.manual_seed(0)
    model = ViTForImageClassification(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)

    def step(batch):
        model(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main(argv=None) -> int:
    args = options(__doc__, "data_dir").parse_args(argv)
    block, rounds = (3, 1) if args.quick else (10, 4)
    config = ViTConfig.from_pretrained(BUNDLED_MODEL, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    spec = PixelSpec(size=config.image_size)
    train = load_splits(args.data_dir)["train"]
    if args.quick:
        train = train.shuffle(seed=0).select(range(BATCH * 12))
    print(f"train split: {len(train)} images", flush=True)
    plain = with_sample_index(train).with_transform(BatchTransform(spec, Augmentation(), seed=SEED))
    start = time.perf_counter()
    cached = CachedDecode(train, spec, Augmentation(), seed=SEED)
    cache_seconds, cache_mib = time.perf_counter() - start, cached.pixels.nbytes / 2**20
    print(f"decoded {len(cached)} images once in {cache_seconds:.1f} s ({cache_mib:.0f} MiB)", flush=True)

    # Same seed -> the cached feed gives exactly the pipeline's batches.
    reference, batches = ([batch for _, batch in zip(range(2), loader(feed, 0, seed=7))] for feed in (plain, cached))
    identical = all(torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["labels"], b["labels"])
                    for a, b in zip(reference, batches))
    print(f"cached decode gives identical batches: {identical}", flush=True)
    feeds = {
        MEMORY: endless(lambda: iter(reference)),
        TRAINER_DEFAULT: endless(lambda: iter(loader(plain, 0))),
        "pipeline, 1 worker": endless(lambda: iter(loader(plain, 1))),
        "cached decode, 0 workers": endless(lambda: iter(loader(cached, 0))),
    }
    step = trainer_step(config)
    fetch, fetch_cpu = {}, {}  # the pipeline's cost alone: time to produce one batch without training
    for name, feed in feeds.items():
        next(feed)
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(3):
            next(feed)
        fetch[name] = (time.perf_counter() - start) / 3
        fetch_cpu[name] = (time.process_time() - cpu_start) / 3  # this process only (not a worker's)
        step(next(feed))  # warm-up step
    blocks = interleaved({name: (lambda i, feed=feed: [step(next(feed)) for _ in range(block)])
                          for name, feed in feeds.items()}, rounds, warmup=0)

    per_step = {name: statistics.median(times) / block for name, times in blocks.items()}
    rows, results = [], {}
    for name, seconds in per_step.items():
        overhead = 100 * (seconds - per_step[MEMORY]) / per_step[MEMORY]
        results[name] = {"seconds_per_step": seconds, "steps_per_s": 1 / seconds, "images_per_s": BATCH / seconds,
                         "pipeline_overhead_percent": overhead, "batch_fetch_alone_s": fetch[name],
                         "batch_fetch_alone_cpu_s": fetch_cpu[name], "blocks": [t / block for t in blocks[name]]}
        rows.append([name, 1 / seconds, BATCH / seconds, f"{overhead:+.1f}%", 1000 * fetch[name],
                     1000 * fetch_cpu[name]])
    best = min((name for name in per_step if name != MEMORY), key=per_step.get)
    default = results[TRAINER_DEFAULT]["pipeline_overhead_percent"]
    data = {"images": len(train), "batch": BATCH, "block_steps": block, "rounds": rounds, "feeds": results,
            "cached_identical_to_pipeline": identical, "cache_seconds": cache_seconds, "cache_mib": cache_mib}
    write_results("train_pipeline", args, data, [section(
        f"Training input pipeline: bundled architecture, batch {BATCH}, {len(train)} training images",
        ["feed", "steps/s", "images/s", "cost vs memory", "one batch alone (ms)", "its CPU ms (main process)"], rows,
        f"Cached decode: {len(cached)} images decoded once in {cache_seconds:.1f} s, {cache_mib:.0f} MiB; identical "
        f"batches to the pipeline for the same seed: {identical}.\n\n"
        f"- {verdict(f'Goal: pipeline costs < 10%: Trainer default (0 workers) {default:+.1f}%', default < 10)}; "
        f"best feed: {best} ({results[best]['pipeline_overhead_percent']:+.1f}%)")])
    return 0

if __name__ == "__main__":
    sys.exit(main())
