"""pretrain_mae.py end to end on a tiny ViTMAE and real X-rays: bad files skipped and named, the encoder
handed to train_vit.py whole, and a SIGKILL mid-run resumed to the unbroken run's weights."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hard_kill import kill_once_written
from odd_files import bad_files, make_odd_files, readable_files

REPO = Path(__file__).resolve().parent.parent
TINY_MAE = ("image_size=64,patch_size=16,hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,"
            "decoder_hidden_size=16,decoder_num_hidden_layers=1,decoder_num_attention_heads=2,decoder_intermediate_size=32")
# 40 images, batch 8: 5 steps an epoch, 3 epochs; a checkpoint every 2 steps, so most fall inside an epoch.
RUN = ["--config_overrides", TINY_MAE, "--use_cpu", "--report_to", "none", "--disable_tqdm", "true", "--seed", "3",
       "--num_train_epochs", "3", "--per_device_train_batch_size", "8", "--learning_rate", "0.001",
       "--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "1000"]


@pytest.fixture(scope="module")
def unlabeled(small_prepared, data_root, tmp_path_factory) -> tuple[Path, dict]:
    """40 prepared training images and a folder of the odd files the app meets (16-bit, RGBA, DICOM, text, corrupt...)."""
    folder = tmp_path_factory.mktemp("unlabeled")
    for path in sorted((small_prepared / "train").rglob("*.pgm"))[:40]:
        shutil.copy(path, folder / path.name)
    xray = sorted((data_root / "chest_xray_originals" / "test" / "NORMAL").iterdir())[0]
    return folder, make_odd_files(folder / "odd", xray)


@pytest.fixture(scope="module")
def image_dir(unlabeled) -> Path:
    return unlabeled[0]


def run(args: list[str], home: Path, **popen) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(home), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "pretrain_mae.py", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def finished(args: list[str], home: Path) -> str:
    process = run(args, home)
    log = process.communicate(timeout=300)[0]
    assert process.returncode == 0, log[-3000:]
    return log


@pytest.fixture(scope="module")
def unbroken(image_dir, tmp_path_factory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("mae")
    log = finished(RUN + ["--image_dirs", str(image_dir), "--output_dir", str(folder / "run")], folder / "hf_home")
    return folder / "run", log


def test_bad_files_are_skipped_and_named(unbroken, unlabeled):
    output, log = unbroken
    odd = unlabeled[1]
    for name, entry in bad_files(odd).items():
        assert str(entry.path) in log, name
    readable = 40 + len(readable_files(odd))
    assert f"pretraining on {readable} images" in log
    stats = json.loads((output / "run_stats.json").read_text())
    assert (stats["images"], stats["skipped_files"]) == (readable, len(bad_files(odd)))


def test_fine_tuning_starts_from_every_encoder_weight(unbroken):
    """train_vit.py's loader must place each pretrained encoder tensor (transformers 5 renames ViT keys on load)."""
    import torch
    from transformers import ViTMAEForPreTraining

    import train_vit

    output, _ = unbroken
    last = max(output.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    mae = ViTMAEForPreTraining.from_pretrained(last).state_dict()
    model, spec = train_vit.build_model(train_vit.ModelArguments(model_name_or_path=str(output)))
    encoder = {name: value for name, value in model.state_dict().items() if name.startswith("vit.")}
    assert spec.size == 64 and len(encoder) == len([name for name in mae if name.startswith("vit.")])
    for name, value in encoder.items():
        assert torch.equal(value, mae[name]), name


def test_sigkill_then_resume_matches_the_unbroken_run(image_dir, unbroken, tmp_path):
    from safetensors.torch import load_file

    output = tmp_path / "run"
    args = RUN + ["--image_dirs", str(image_dir), "--output_dir", str(output)]
    target = output / "checkpoint-6" / "trainer_state.json"  # step 6: the 2nd of the 2nd epoch's 5 steps
    kill_once_written(run(args + ["--dataloader_num_workers", "2"], tmp_path / "hf_home", start_new_session=True),
                      target)
    assert not (output / "model.safetensors").exists()

    resumed = finished(args + ["--resume_from_checkpoint", "last"], tmp_path / "hf_home")
    assert "resuming from" in resumed
    expected, actual = load_file(str(unbroken[0] / "model.safetensors")), load_file(str(output / "model.safetensors"))
    assert expected.keys() == actual.keys()
    difference = max((expected[name] - actual[name]).abs().max().item() for name in expected)
    assert difference <= 1e-6, f"encoder weights differ by up to {difference}"


def test_empty_folder_and_held_out_splits_are_refused(small_prepared, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder, message in ((empty, "no readable image"), (small_prepared, "validation or test split"),
                            (small_prepared / "test", "validation or test split")):
        result = subprocess.run([sys.executable, "pretrain_mae.py", "--image_dirs", str(folder), "--output_dir", str(tmp_path / "out"),
                                 "--use_cpu"], cwd=REPO, capture_output=True, text=True, timeout=120,
                                env=dict(os.environ, HF_HUB_OFFLINE="1"))
        assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
