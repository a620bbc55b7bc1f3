"""The serving settings app.py and predict.py take from the environment, parsed once, here: the library
reads no environment variable. A switch is off with 0, false, no or off (any case), on otherwise."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

OFF = ("0", "false", "no", "off")
# Requests waiting for the model, all endpoints together; one more is refused at once with "busy".
# Sized for 100 concurrent clients with a request each (none refused) and a wait of a few seconds
# at the app's throughput on 2 vCPUs (benchmarks/crowd.py); more cores serve a longer queue in the same wait.
DEFAULT_MAX_WAITING = 128


@dataclass(frozen=True)
class ServingSettings:
    model_id: str | None = None  # MODEL_ID: a local folder or a Hub id; None: the bundled model
    fast: bool = True  # PNEUMONIA_VIT_FAST: score on the fast path (pneumonia_vit/inference/fast_path.py)
    cache: Path | None = None  # PNEUMONIA_VIT_CACHE: where the fast path's export is kept
    threads: int | None = None  # PNEUMONIA_VIT_THREADS: the fast path's threads; None: every usable core
    max_waiting: int = DEFAULT_MAX_WAITING  # PNEUMONIA_VIT_QUEUE: requests that may wait before "busy"

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> ServingSettings:
        """`environ`: os.environ at the edges, a plain dict in tests."""
        model_id, fast, cache, threads, queue = (
            environ.get(name, "").strip() for name in
            ("MODEL_ID", "PNEUMONIA_VIT_FAST", "PNEUMONIA_VIT_CACHE", "PNEUMONIA_VIT_THREADS", "PNEUMONIA_VIT_QUEUE")
        )
        if queue and (not queue.isdigit() or int(queue) < 1):
            raise ValueError(f"PNEUMONIA_VIT_QUEUE={queue!r}: give how many requests may wait, such as {DEFAULT_MAX_WAITING}")
        return cls(model_id=model_id or None, fast=fast.lower() not in OFF, cache=Path(cache) if cache else None,
                   threads=max(1, int(threads)) if threads else None,
                   max_waiting=int(queue) if queue else DEFAULT_MAX_WAITING)

    def fast_path(self) -> dict:
        """The keywords of `Service.load` and `Classifier.load` that choose and place the fast path."""
        return {"fast": self.fast, "cache": self.cache, "threads": self.threads}
