"""`Service` without gradio: every answer is the scoring model's on that one image, whatever the concurrency."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from pneumonia_vit.images import InvalidImageError, load_xray

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "examples").glob("*.jpeg"))


def test_concurrent_requests_are_scored_alone_and_a_bad_file_fails_alone(tiny_model_dir, tmp_path):
    from pneumonia_vit.inference.classifier import Classifier
    from pneumonia_vit.serving.service import Service

    service = Service.load(str(tiny_model_dir), cache=tmp_path / "cache")
    assert service.backend == "onnxruntime-int8" and service.explainer is None
    fast = Classifier.load(str(tiny_model_dir), cache=tmp_path / "cache")
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    jobs = [*EXAMPLES, bad, *EXAMPLES]
    barrier = threading.Barrier(len(jobs))

    def one(path):
        barrier.wait()
        try:
            return service.analyze(path, explain=False)
        except InvalidImageError as error:
            return error

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        answers = list(pool.map(one, jobs))
    assert isinstance(answers[len(EXAMPLES)], InvalidImageError) and "not a readable image" in str(answers[len(EXAMPLES)])
    single = {path: float(fast.pneumonia_probability([load_xray(path)])[0]) for path in EXAMPLES}
    for path, analysis in zip(jobs, answers):
        if path != bad:
            assert analysis.p_pneumonia == pytest.approx(single[path], abs=1e-6), path.name
            assert analysis.decision == (("PNEUMONIA" if analysis.p_pneumonia >= service.threshold else "NORMAL")
                                         if analysis.domain.in_domain else None), "no decision outside the domain"
    listed = service.analyze_files([*EXAMPLES, bad])
    assert isinstance(listed[-1], InvalidImageError)
    assert [analysis.p_pneumonia for analysis in listed[:-1]] == pytest.approx([single[path] for path in EXAMPLES], abs=1e-6)


def test_service_scores_like_the_classifier_and_explains_with_pytorch(tiny_model_dir, tmp_path):
    from pneumonia_vit.inference.classifier import Classifier
    from pneumonia_vit.serving.service import Service

    service = Service.load(str(tiny_model_dir), explain=True, cache=tmp_path / "cache")
    fast = Classifier.load(str(tiny_model_dir), cache=tmp_path / "cache")
    images = [load_xray(path) for path in EXAMPLES]
    scored = [service.analyze(path, explain=False) for path in EXAMPLES]
    assert np.allclose([a.p_pneumonia for a in scored], [fast.pneumonia_probability([image])[0] for image in images], atol=1e-6)
    explained = service.analyze(EXAMPLES[0])  # the page: the scoring model's numbers, the fp32 model's heatmap
    assert explained.heatmap is not None
    assert explained.p_pneumonia == pytest.approx(float(fast.pneumonia_probability(images[:1])[0]), abs=1e-6)
    assert service.explainer.config._attn_implementation == "eager"
    fp32 = Service.load(str(tiny_model_dir), explain=True, fast=False)
    assert fp32.backend == "torch-fp32" and fp32.explainer is fp32.classifier.model, "one PyTorch model, loaded once"
