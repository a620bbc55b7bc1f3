"""scripts/gpu_run.sh and the GPU/accelerate configs, checked on CPU: `--smoke` runs the script's
every step (package install, data_prep, train_vit.py, summary) with a tiny CPU config, and the
summary must carry the figures a GPU run reports (images/s, peak GPU memory, test metrics)."""

from __future__ import annotations

import json
import os
import re
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_run.sh"


def run_script(args: list[str], tmp_path: Path, timeout: int = 400, python: Path | str = sys.executable,
               skip_install: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=str(python), GPU_RUN_WORKDIR=str(tmp_path / "work"),
               GPU_RUN_SKIP_INSTALL="1" if skip_install else "0", OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)


def imports_pneumonia_vit(python: Path) -> subprocess.CompletedProcess:
    """`import pneumonia_vit` as a script outside the checkout sees it: from "/", without PYTHONPATH."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run([str(python), "-c", "import pneumonia_vit; print(pneumonia_vit.__path__[0])"], cwd="/",
                          env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def python_without_the_package(tmp_path) -> Path:
    """A fresh venv that sees every requirement this interpreter has, but not pneumonia_vit: its
    site-packages names (less the package's own) are linked into a folder outside the venv, so
    that pip counts them as installed and never touches them. The folder is named site-packages:
    dill, hashing datasets' transforms, pickles classes by reference only from such a path."""
    shared = tmp_path / "shared" / "site-packages"
    shared.mkdir(parents=True)
    for folder in map(Path, site.getsitepackages()):
        for entry in folder.iterdir() if folder.is_dir() else ():
            if "pneumonia_vit" not in entry.name.lower().replace("-", "_") and not (shared / entry.name).exists():
                (shared / entry.name).symlink_to(entry)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    (venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
     / "requirements.pth").write_text(f"{shared}\n")
    python = venv / "bin" / "python"
    assert "No module named 'pneumonia_vit'" in imports_pneumonia_vit(python).stderr
    return python


def test_smoke_run_installs_the_package_and_prints_throughput_memory_and_test_metrics(
        small_kaggle_tree, tmp_path, python_without_the_package):
    results = tmp_path / "results"
    result = run_script(["--smoke", str(small_kaggle_tree), str(results)], tmp_path,
                        python=python_without_the_package, skip_install=False)
    out = result.stdout
    assert result.returncode == 0, out[-4000:] + result.stderr[-2000:]
    assert re.search(r"packages: pip install --no-deps .*-e " + re.escape(str(REPO)), out), out
    installed = imports_pneumonia_vit(python_without_the_package)
    assert Path(installed.stdout.strip()) == REPO / "pneumonia_vit", installed.stderr
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


def test_without_the_package_and_with_install_skipped_it_stops_at_once_saying_what_to_install(
        small_kaggle_tree, tmp_path, python_without_the_package):
    result = run_script(["--smoke", str(small_kaggle_tree)], tmp_path, timeout=120, python=python_without_the_package)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "No module named 'pneumonia_vit'" in result.stdout, result.stdout
    assert f"{python_without_the_package} -m pip install --no-deps -e {REPO}" in result.stdout, result.stdout
    assert not (tmp_path / "work" / "prepared_64").exists()


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
    args = train_vit.parse_arguments([str(REPO / "configs" / f"{name}.yaml"), "--use_cpu", "--tf32", "false"])
    model_args, data_args, run_args, training_args = args.model, args.data, args.run, args.training
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
