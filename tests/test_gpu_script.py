"""scripts/gpu_run.sh and the GPU/accelerate configs, checked on CPU: `--smoke` runs the script's
every step (package check, data_prep, train_vit.py, summary) with a tiny CPU config, and the
summary must carry the figures a GPU run reports (images/s, peak GPU memory, test metrics)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_run.sh"


def run_script(args: list[str], tmp_path: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, GPU_RUN_WORKDIR=str(tmp_path / "work"), GPU_RUN_SKIP_INSTALL="1",
               OMP_NUM_THREADS="1")
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_smoke_run_prints_throughput_memory_and_test_metrics(small_kaggle_tree, tmp_path):
    results = tmp_path / "results"
    result = run_script(["--smoke", str(small_kaggle_tree), str(results)], tmp_path)
    out = result.stdout
    assert result.returncode == 0, out[-4000:] + result.stderr[-2000:]
    assert re.search(r"^images/s: \d+(\.\d+)? training images/s \(\d+ images in [\d.]+ s", out, re.M), out
    assert re.search(r"^peak GPU memory: n/a \(no GPU\)$", out, re.M), out
    # small_kaggle_tree: 12 + 12 official test images, all evaluated.
    assert re.search(r"^test metrics \(n=24, threshold [\d.]+\): ROC-AUC [\d.]+, accuracy [\d.]+", out, re.M), out
    assert re.search(r"^validation metrics \(n=\d+,", out, re.M), out
    assert re.search(r"done in \d+ s$", out.strip())
    for name in ("run_stats.json", "test_metrics.json", "validation_metrics.json", "summary.txt", "gpu_run.log",
                 "train.log", "README.md", "prepare_report.json"):
        assert (results / name).is_file(), name
    stats = json.loads((results / "run_stats.json").read_text())
    assert stats["images_per_second"] > 0 and stats["peak_gpu_memory_gib"] is None
    assert json.loads((results / "test_metrics.json").read_text())["n"] == 24
    assert not list(results.glob("*.safetensors"))  # weights stay in the work folder


def test_without_a_gpu_the_real_run_stops_at_once(small_kaggle_tree, tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    result = run_script([str(small_kaggle_tree)], tmp_path, timeout=120)
    assert result.returncode == 4 and "no CUDA GPU visible" in result.stdout, result.stdout + result.stderr


def test_bad_arguments(tmp_path):
    assert run_script([], tmp_path, timeout=30).returncode == 2
    result = run_script([str(tmp_path / "nowhere")], tmp_path, timeout=30)
    assert result.returncode == 2 and "no such folder" in result.stderr


@pytest.mark.parametrize("name, parameters", [("vit_small_gpu", (21e6, 23e6)), ("vit_base_gpu", None)])
def test_gpu_training_configs_parse(name, parameters):
    import train_vit

    # bf16 and tf32 need a GPU: parse with the two overrides a CPU machine needs.
    model_args, data_args, run_args, training_args = train_vit.parse_arguments(
        [str(REPO / "configs" / f"{name}.yaml"), "--use_cpu", "--tf32", "false"]
    )
    assert training_args.bf16 and training_args.load_best_model_at_end and training_args.metric_for_best_model == "roc_auc"
    assert training_args.dataloader_num_workers >= 4
    if parameters:
        assert model_args.model_name_or_path is None and "image_size=224" in model_args.config_overrides and run_args.max_train_minutes
        model, spec = train_vit.build_model(model_args)
        assert parameters[0] < sum(p.numel() for p in model.parameters()) < parameters[1] and spec.size == 224
    else:
        assert model_args.model_name_or_path == "google/vit-base-patch16-224-in21k" and "hidden_dropout_prob=0.1" in model_args.config_overrides
        assert data_args.data_dir == "data/chest_xray_prepared" and training_args.output_dir == "runs/vit_base"


@pytest.mark.parametrize("name, kind, processes, machines", [
    ("single_gpu", "NO", 1, 1), ("multi_gpu", "MULTI_GPU", -1, 1), ("multi_node", "MULTI_GPU", 16, 2),
])
def test_accelerate_configs_load(name, kind, processes, machines):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "configs" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.value == kind and config.mixed_precision == "bf16"
    assert (config.num_processes, config.num_machines) == (processes, machines)
