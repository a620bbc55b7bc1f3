"""Multi-process training: `accelerate launch` with configs/accelerate/multi_gpu.yaml and 2 processes
on CPU (gloo), compared with the same run in one process.

    accelerate launch --config_file configs/accelerate/multi_gpu.yaml --num_processes 2 --mixed_precision no \
        train_vit.py ... --use_cpu

(`--cpu --num_processes 2` would start one process only: accelerate's CPU launcher runs the script
once unless it is given an MPI hostfile. MULTI_GPU starts torchrun, and `--use_cpu` then makes each
process a gloo CPU rank.)

Both runs see the same global batch (8 per device x 1 process x 2 accumulation = 4 x 2 x 2 = 16)
on 128 training images (a multiple of 16, so no process pads its last batch) without
augmentation, so they compute the same thing up to floating-point summation order. Tolerances:
P(PNEUMONIA) of every validation and test image within 2e-3 (measured: about 1e-6 to 1e-4),
validation and test ROC-AUC within 0.01 (measured: equal), decision thresholds within 2e-3.

Validation (35) and test (39) have odd sizes, so the distributed samplers pad them; every image
must still count exactly once. Files are written and the push is made by the main process only:
a sitecustomize module in the subprocesses records every Python-level open() for writing inside
the output folder, per rank, and a local stand-in of the Hub (tests/hub_standin.py) counts the
commits of both runs. Last, a 2-process resume from a checkpoint ends like the unbroken 2-process
run (weights within 1e-6).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hub_standin import HubStandIn
from real_subset import prepared_subset, split_sizes
from tiny_vit import TINY_VIT

REPO = Path(__file__).resolve().parent.parent
SCORE_TOLERANCE = 2e-3
AUC_TOLERANCE = 0.01
COMMON = [
    "--config_overrides", TINY_VIT, "--use_cpu", "--report_to", "none",
    "--disable_tqdm", "true", "--dataloader_num_workers", "0", "--seed", "42", "--augment", "false",
    "--max_train_samples", "128", "--num_train_epochs", "8", "--learning_rate", "0.001",
    "--gradient_accumulation_steps", "2", "--per_device_eval_batch_size", "4", "--eval_strategy", "epoch",
    "--save_strategy", "epoch", "--load_best_model_at_end", "--metric_for_best_model", "roc_auc",
    "--early_stopping_patience", "0", "--logging_steps", "1000",
]
PUSH = ["--push_to_hub", "--hub_strategy", "end", "--hub_token", "dummy"]
LAUNCH = ["launch", "--config_file", "configs/accelerate/multi_gpu.yaml", "--num_processes", "2", "--mixed_precision", "no"]


def accelerate() -> str:
    return shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"


AUDIT = '''
import builtins, io, os
_folder = os.environ.get("AUDIT_DIR")
if _folder:
    _open, _log = builtins.open, os.path.join(os.environ["AUDIT_LOG"], "rank-%s.log" % os.environ.get("RANK", "none"))

    def _audited(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and any(flag in mode for flag in "wax+"):
            path = os.path.abspath(os.fsdecode(file))
            if path.startswith(_folder):
                with _open(_log, "a") as handle:
                    handle.write(path + "\\n")
        return _open(file, mode, *args, **kwargs)

    builtins.open = io.open = _audited
'''


def training_env(hf_home: Path, **extra: str) -> dict:
    """This process's environment without its Hugging Face settings (a developer's HF_DATASETS_CACHE or
    HF_HUB_CACHE would outrank HF_HOME), one thread per process: the same for every run that is
    compared with another."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGING_FACE"))}
    env.update(HF_HOME=str(hf_home), HF_DATASETS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               HF_EVALUATE_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def written(audit: Path, rank: str) -> Counter:
    log = audit / f"rank-{rank}.log"
    return Counter(Path(line).name for line in log.read_text().splitlines()) if log.exists() else Counter()


@pytest.fixture(scope="module")
def runs(data_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed")
    data = prepared_subset(data_root, folder / "data", {"train": (80, 85), "val": (4, 4), "test": (20, 19)},
                           validation_fraction=0.2)
    sizes = split_sizes(data)
    for split in ("validation", "test"):
        assert sum(sizes[split].values()) % 2 == 1, f"{split} should have an odd size: {sizes}"
    (folder / "site").mkdir()
    (folder / "site" / "sitecustomize.py").write_text(AUDIT)
    results = {"data": data, "sizes": sizes}
    with HubStandIn() as hub:
        for name, launcher, batch in (
            ("single", [sys.executable], "8"),
            ("ddp", [accelerate(), *LAUNCH], "4"),
        ):
            output, audit = folder / name, folder / f"audit-{name}"
            audit.mkdir()
            env = training_env(
                folder / f"hf_home_{name}", HF_ENDPOINT=hub.endpoint,
                PYTHONPATH=os.pathsep.join([str(folder / "site"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                AUDIT_DIR=str(output), AUDIT_LOG=str(audit),
            )
            result = subprocess.run(
                [*launcher, "train_vit.py", *COMMON, *PUSH, "--per_device_train_batch_size", batch, "--data_dir", str(data),
                 "--output_dir", str(output), "--hub_model_id", f"user/pneumonia-{name}"],
                cwd=REPO, env=env, capture_output=True, text=True, timeout=400,
            )
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
            results[name] = {"output": output, "audit": audit, "log": result.stdout + result.stderr,
                             "stdout": result.stdout}
    results["hub"] = hub
    return results


def metrics(run: dict, split: str) -> dict:
    return json.loads((run["output"] / f"{split}_metrics.json").read_text())


def scores(model_dir: Path, data: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Labels and P(PNEUMONIA) of every image of a prepared split, scored in this one process by the
    saved fp32 model through the training pipeline's preprocessing (not the app's int8 fast path)."""
    import torch
    from transformers import AutoModelForImageClassification

    from pneumonia_vit.images import LABELS, load_xray
    from pneumonia_vit.inference.classifier import load_pixel_spec
    from pneumonia_vit.preprocess import pixel_values

    model = AutoModelForImageClassification.from_pretrained(str(model_dir)).eval()
    spec = load_pixel_spec(str(model_dir))
    paths = [(label, path) for label, name in enumerate(LABELS) for path in sorted((data / split / name).iterdir())]
    with torch.inference_mode():
        logits = model(pixel_values=pixel_values([load_xray(path) for _, path in paths], spec)).logits
    return np.array([label for label, _ in paths]), logits.float().softmax(dim=-1)[:, 1].numpy()


def test_both_processes_train_with_the_logged_effective_batch(runs):
    single, ddp = runs["single"], runs["ddp"]
    assert "effective batch size 16 = 8 per device x 1 processes x 2 accumulation steps" in single["stdout"]
    assert "effective batch size 16 = 4 per device x 2 processes x 2 accumulation steps" in ddp["stdout"]
    assert ddp["stdout"].count("effective batch size") == 1  # printed by the main process only
    checkpoints = sorted(ddp["output"].glob("checkpoint-*"))
    assert checkpoints
    for checkpoint in checkpoints:  # each process saved its own RNG state at every checkpoint: both trained
        assert {path.name for path in checkpoint.glob("rng_state*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    # The same number of optimizer steps: 8 epochs x 128 images / 16 per step.
    for run in (single, ddp):
        last = max(run["output"].glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
        assert json.loads((last / "trainer_state.json").read_text())["global_step"] == 8 * 128 // 16


@pytest.mark.parametrize("split", ["validation", "test"])
def test_every_evaluation_image_counts_exactly_once(runs, split):
    sizes, ddp = runs["sizes"][split], runs["ddp"]
    result = metrics(ddp, split)
    matrix = result["confusion_matrix"]
    assert result["n"] == sum(sizes.values())
    assert matrix["tn"] + matrix["fp"] == sizes["NORMAL"] and matrix["fn"] + matrix["tp"] == sizes["PNEUMONIA"]
    # The gathered predictions pair with the right labels: scoring the saved model in one process gives the
    # same ROC-AUC (exactly, but for float noise) and, on test, the same confusion matrix.
    labels, probabilities = scores(ddp["output"], runs["data"], split)
    from pneumonia_vit.training.evaluation import binary_metrics

    again = binary_metrics(labels, probabilities, result["threshold"])
    assert again["roc_auc"] == pytest.approx(result["roc_auc"], abs=1e-6)
    if split == "test":  # (validation holds the image whose score is the threshold: float noise may flip it)
        assert again["confusion_matrix"] == matrix


def test_only_the_main_process_writes_files(runs):
    single, ddp = runs["single"], runs["ddp"]
    assert written(ddp["audit"], "1") == Counter(), "process 1 wrote into the output folder"
    assert written(ddp["audit"], "none") == Counter()  # the launcher itself
    main, alone = written(ddp["audit"], "0"), written(single["audit"], "none")
    for name in ("validation_metrics.json", "test_metrics.json", "README.md", "config.json"):
        assert main[name] == alone[name] >= 1, (name, main, alone)
    assert main == alone, (main, alone)  # the same writes as one process makes, not one more
    card = (ddp["output"] / "README.md").read_text()
    assert card.startswith("---\nlicense: cc-by-4.0\n") and "not a medical device" in card
    for text in (ddp["stdout"],):
        assert text.count('"validation": {') == 1 and text.count("loading the best model") == 1


def test_only_the_main_process_pushes(runs):
    hub = runs["hub"]
    assert hub.unexpected == [], hub.unexpected
    assert sorted(repo_id for _, repo_id in hub.repos) == ["user/pneumonia-ddp", "user/pneumonia-single"]
    creates = [path for method, path, _ in hub.requests if method == "POST" and path == "/api/repos/create"]
    assert len(creates) == 2  # one per run: process 1 never asked
    single, ddp = hub.repo("user/pneumonia-single"), hub.repo("user/pneumonia-ddp")
    assert len(ddp.commits) == len(single.commits) >= 1, ([c.summary for c in single.commits], [c.summary for c in ddp.commits])
    output = runs["ddp"]["output"]
    for name in ("model.safetensors", "config.json", "README.md", "test_metrics.json"):
        assert ddp.files[name] == (output / name).read_bytes(), name


def test_distributed_model_scores_like_the_single_process_one(runs):
    single, ddp = runs["single"], runs["ddp"]
    for split in ("validation", "test"):
        expected, actual = metrics(single, split), metrics(ddp, split)
        assert actual["roc_auc"] == pytest.approx(expected["roc_auc"], abs=AUC_TOLERANCE), split
        assert actual["threshold"] == pytest.approx(expected["threshold"], abs=SCORE_TOLERANCE), split
        _, p_single = scores(single["output"], runs["data"], split)
        _, p_ddp = scores(ddp["output"], runs["data"], split)
        difference = float(np.abs(p_single - p_ddp).max())
        print(f"{split}: max |P(PNEUMONIA) single - 2 processes| = {difference:.2e}, "
              f"ROC-AUC {expected['roc_auc']:.4f} vs {actual['roc_auc']:.4f}")
        assert difference <= SCORE_TOLERANCE, f"{split}: scores differ by up to {difference}"
        assert len(set(np.round(p_single, 3))) > 5  # a model that learned something, not a constant


def test_distributed_resume_matches_the_unbroken_distributed_run(runs, tmp_path):
    """Resume with 2 processes from the checkpoint of epoch 4 of 8 (each process restores its own RNG
    file): the end is the unbroken 2-process run's, to within 1e-6. (A resume in the middle of an epoch
    with augmentation on was checked by hand the same way: bit-identical.)"""
    from safetensors.torch import load_file

    ddp, output = runs["ddp"]["output"], tmp_path / "run"
    output.mkdir()
    for step in (16, 24, 32):
        shutil.copytree(ddp / f"checkpoint-{step}", output / f"checkpoint-{step}")
    env = training_env(tmp_path / "hf_home", HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [accelerate(), *LAUNCH, "train_vit.py", *COMMON, "--per_device_train_batch_size", "4", "--data_dir",
         str(runs["data"]), "--output_dir", str(output), "--resume_from_checkpoint", "last"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert result.stdout.count(f"resuming from {output / 'checkpoint-32'}") == 1
    a, b = load_file(str(ddp / "model.safetensors")), load_file(str(output / "model.safetensors"))
    assert max((a[name] - b[name]).abs().max().item() for name in a) <= 1e-6
    for split in ("validation", "test"):
        assert metrics({"output": output}, split)["roc_auc"] == pytest.approx(metrics(runs["ddp"], split)["roc_auc"], abs=1e-6)
