"""Dynamic batching for the API: requests from many threads, one model forward per batch.

Why not gradio's own `batch=True`: gradio 6 runs a batched event as one call and, when that call
raises, sends the same error to every request in the batch (gradio/queueing.py, process_events),
so one unreadable upload would fail up to seven good ones with another user's message. Its
per-request `validator=` hook, which runs before batching, is skipped for `batch=True` events in
gradio 6.31 (the batched validator's answer arrives as a tuple and is read as "valid"). And a
batched call decodes all its files one after the other in one thread.

Here each request runs in its own gradio worker thread (the event's concurrency limit is the
batch size): it decodes and checks its own file there, so an unusable file raises its own error
to its own client, and only then hands the decoded image to the batcher. A worker thread takes
everything that is waiting, up to `max_batch`, and scores it in one forward. Nothing waits on a
timer when the server is idle: a lone request is scored at once, alone. While other requests are
still decoding, the worker waits for them up to `max_wait_s`, so concurrent requests share a forward.
With `workers` > 1, that many forwards may run at once (each on whatever is waiting when it
starts): a large model's forwards then fill both cores of a 2-vCPU machine, as two unbatched
requests at a time did, while a small model's requests still share forwards.

What it buys depends on the model: for the bundled 2.7 M-parameter ViT an int8 forward costs about
2.5 ms for one image and 1.2 ms per image in a batch of 8, against roughly 12 ms of CPU that gradio
spends on each API request (upload, queue, event stream), so most of the API's gain comes from the
fast path itself; benchmarks/api_throughput.py measures the app with and without batching.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class MicroBatcher(Generic[Item, Result]):
    """`run(prepare)` from any thread: `prepare()` runs in the caller's thread (its exceptions go to
    that caller only); its result is scored together with whatever other callers are waiting by
    `score(items) -> results` (same length, same order) in the batcher's own thread.

    An exception raised by `score` goes to every caller of that batch: it is a failure of the model,
    not of any one input.
    """

    def __init__(self, score: Callable[[Sequence[Item]], Sequence[Result]], max_batch: int = 8,
                 max_wait_s: float = 0.005, workers: int = 1, name: str = "micro-batcher"):
        if max_batch < 1 or workers < 1:
            raise ValueError(f"max_batch and workers must be at least 1, not {max_batch} and {workers}")
        self.score = score
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._condition = threading.Condition()
        self._pending: list[tuple[Item, Future]] = []
        self._preparing = 0  # callers inside prepare(): items that will arrive soon
        self.batches = 0  # counters, for logs and benchmarks
        self.items = 0
        self._workers = [threading.Thread(target=self._loop, name=f"{name}-{index}", daemon=True)
                         for index in range(workers)]
        for worker in self._workers:
            worker.start()

    def run(self, prepare: Callable[[], Item]) -> tuple[Result, int]:
        """(the item's result, the size of the batch it was scored in)."""
        with self._condition:
            self._preparing += 1
        try:
            item = prepare()
        except BaseException:
            with self._condition:
                self._preparing -= 1
                self._condition.notify_all()
            raise
        future: Future = Future()
        with self._condition:
            self._preparing -= 1
            self._pending.append((item, future))
            self._condition.notify_all()
        return future.result()

    def _next_batch(self) -> list[tuple[Item, Future]]:
        with self._condition:
            while True:
                while not self._pending:
                    self._condition.wait()
                deadline = time.monotonic() + self.max_wait_s
                while 0 < len(self._pending) < self.max_batch and self._preparing > 0:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._condition.wait(remaining)
                if self._pending:  # another worker may have taken them meanwhile
                    batch = self._pending[: self.max_batch]
                    del self._pending[: self.max_batch]
                    self.batches += 1
                    self.items += len(batch)
                    return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            try:
                results = self.score([item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"the batch scorer returned {len(results)} results for {len(batch)} items")
            except BaseException as error:  # noqa: BLE001  (handed to the callers, who re-raise it)
                for _, future in batch:
                    future.set_exception(error)
                continue
            for (_, future), result in zip(batch, results):
                future.set_result((result, len(batch)))
