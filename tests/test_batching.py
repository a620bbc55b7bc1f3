"""The API's dynamic batching (pneumonia_vit/serving/batching.py) and `Service.predict`, without gradio."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from pneumonia_vit.images import InvalidImageError, load_xray, read_xray
from pneumonia_vit.serving.batching import MicroBatcher

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "examples").glob("*.jpeg"))


class Recorder:
    """A scorer that records its batches and takes `delay` seconds per call."""

    def __init__(self, delay: float = 0.05):
        self.delay = delay
        self.batches: list[list] = []

    def __call__(self, items):
        self.batches.append(list(items))
        time.sleep(self.delay)
        return [item * 10 for item in items]


@pytest.mark.parametrize("workers", [1, 2])
def test_concurrent_requests_share_forwards_in_order(workers):
    scorer = Recorder()
    batcher = MicroBatcher(scorer, max_batch=4, workers=workers)
    with ThreadPoolExecutor(max_workers=10) as pool:
        answers = list(pool.map(lambda i: batcher.run(lambda: i), range(10)))
    assert [result for result, _ in answers] == [i * 10 for i in range(10)]
    assert sorted(item for batch in scorer.batches for item in batch) == list(range(10))
    assert max(len(batch) for batch in scorer.batches) > 1 and all(len(batch) <= 4 for batch in scorer.batches)
    assert all(size == len(next(b for b in scorer.batches if i in b)) for i, (_, size) in enumerate(answers))
    assert (batcher.items, batcher.batches) == (10, len(scorer.batches))


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_prepare_fails_only_its_caller(workers):
    scorer = Recorder()
    batcher = MicroBatcher(scorer, max_batch=8, workers=workers)

    def prepare(i):
        if i % 3 == 0:
            raise InvalidImageError(f"file {i}: not a readable image")
        return i

    def one(i):
        try:
            return batcher.run(lambda: prepare(i))[0]
        except InvalidImageError as error:
            return str(error)

    with ThreadPoolExecutor(max_workers=9) as pool:
        answers = list(pool.map(one, range(9)))
    for i, answer in enumerate(answers):
        assert answer == (f"file {i}: not a readable image" if i % 3 == 0 else i * 10)
    assert not any(i % 3 == 0 for batch in scorer.batches for i in batch)


def test_a_failing_forward_fails_its_batch_and_the_batcher_goes_on():
    calls = []

    def score(items):
        calls.append(list(items))
        if len(calls) == 1:
            raise RuntimeError("model exploded")
        return list(items)

    batcher = MicroBatcher(score, max_batch=8)
    with pytest.raises(RuntimeError, match="model exploded"):
        batcher.run(lambda: 1)
    assert batcher.run(lambda: 2) == (2, 1)


def test_a_lone_request_does_not_wait():
    batcher = MicroBatcher(lambda items: list(items), max_batch=8, max_wait_s=5.0)
    started = time.perf_counter()
    assert batcher.run(lambda: "x") == ("x", 1)
    assert time.perf_counter() - started < 1.0, "nobody else was preparing: no reason to wait"


def test_the_batcher_waits_for_requests_still_decoding():
    scorer = Recorder(delay=0.0)
    batcher = MicroBatcher(scorer, max_batch=8, max_wait_s=2.0)
    second_started = threading.Event()

    def slow_prepare():
        second_started.set()
        time.sleep(0.2)  # still decoding when the first item is handed over
        return 2

    def first():
        second_started.wait()
        return batcher.run(lambda: 1)

    with ThreadPoolExecutor(max_workers=2) as pool:
        slow = pool.submit(batcher.run, slow_prepare)
        fast = pool.submit(first)
        assert fast.result() == (10, 2) and slow.result() == (20, 2)
    assert scorer.batches == [[1, 2]]


def test_service_predict_batches_and_isolates_bad_files(tiny_model_dir, tmp_path):
    from pneumonia_vit.inference.classifier import Classifier
    from pneumonia_vit.serving.service import Service

    service = Service.load(str(tiny_model_dir), max_batch=8, cache=tmp_path / "cache")
    assert service.backend == "onnxruntime-int8" and service.explainer is None
    fast = Classifier.load(str(tiny_model_dir), cache=tmp_path / "cache")
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    jobs = [*EXAMPLES, bad, *EXAMPLES]
    barrier = threading.Barrier(len(jobs))

    def one(path):
        barrier.wait()
        try:
            return service.predict(path)
        except InvalidImageError as error:
            return error

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        answers = list(pool.map(one, jobs))
    assert isinstance(answers[len(EXAMPLES)], InvalidImageError) and "not a readable image" in str(answers[len(EXAMPLES)])
    single = {path: float(fast.pneumonia_probability([load_xray(path)])[0]) for path in EXAMPLES}
    for path, analysis in zip(jobs, answers):
        if path != bad:
            assert analysis.p_pneumonia == pytest.approx(single[path], abs=0.005), path.name
            assert analysis.decision == (("PNEUMONIA" if analysis.p_pneumonia >= service.threshold else "NORMAL")
                                         if analysis.domain.in_domain else None), "no decision outside the domain"
    assert service.batcher.items == 2 * len(EXAMPLES) and service.batcher.batches < service.batcher.items
    # Alone, a request is scored exactly as the fast Classifier scores one image.
    assert service.predict(EXAMPLES[0]).p_pneumonia == pytest.approx(single[EXAMPLES[0]], abs=1e-6)


def test_service_scores_like_the_classifier_and_explains_with_pytorch(tiny_model_dir, tmp_path):
    from pneumonia_vit.inference.classifier import Classifier
    from pneumonia_vit.serving.service import Service

    service = Service.load(str(tiny_model_dir), explain=True, cache=tmp_path / "cache")
    fast = Classifier.load(str(tiny_model_dir), cache=tmp_path / "cache")
    images = [load_xray(path) for path in EXAMPLES]
    scored = service.analyze_many([read_xray(path) for path in EXAMPLES])
    assert np.allclose([a.p_pneumonia for a in scored], [fast.pneumonia_probability([image])[0] for image in images], atol=1e-6)
    explained = service.analyze(EXAMPLES[0])  # the page: the scoring model's numbers, the fp32 model's heatmap
    assert explained.heatmap is not None
    assert explained.p_pneumonia == pytest.approx(float(fast.pneumonia_probability(images[:1])[0]), abs=1e-6)
    assert service.explainer.config._attn_implementation == "eager"
    fp32 = Service.load(str(tiny_model_dir), explain=True, fast=False)
    assert fp32.backend == "torch-fp32" and fp32.explainer is fp32.classifier.model, "one PyTorch model, loaded once"
