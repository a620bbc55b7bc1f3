"""Faults: a training run killed hard (SIGKILL) in the middle of an epoch and resumed, broken
checkpoint folders, and a prepared dataset folder that changed between data_prep and training.

Resume tolerance: the resumed run must end with the same validation and test metrics as the
unbroken run with the same seed to within 1e-6 each, and the same weights to within 1e-6 (it is
bit-identical on CPU, whatever the number of dataloader workers: each image's augmentation is
seeded by (seed, epoch, image index); see data.BatchTransform).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hard_kill import kill_once_written
from real_subset import prepared_subset
from tiny_vit import TINY_VIT

from pneumonia_vit.training.trainer import CheckpointError

REPO = Path(__file__).resolve().parent.parent

METRIC_TOLERANCE = 1e-6
WEIGHT_TOLERANCE = 1e-6
TINY = [
    "--config_overrides", TINY_VIT, "--use_cpu", "--report_to", "none",
    "--disable_tqdm", "true", "--dataloader_num_workers", "0", "--seed", "7",
]
# 9 optimizer steps per epoch (66 training images, batch 8); a checkpoint and an evaluation every
# 4 steps, so most checkpoints fall in the middle of an epoch; early stopping on (its patience
# count must survive the resume too).
RUN = TINY + [
    "--num_train_epochs", "6", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
    "--learning_rate", "0.001", "--eval_strategy", "steps", "--eval_steps", "4", "--save_strategy", "steps",
    "--save_steps", "4", "--load_best_model_at_end", "--metric_for_best_model", "roc_auc",
    "--early_stopping_patience", "6", "--logging_steps", "1000",
]


def environment(home: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(home), OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    return env


def train(args: list[str], home: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "train_vit.py", *args], cwd=REPO, env=environment(home),
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def assert_same_results(expected: Path, actual: Path) -> None:
    for split in ("validation", "test"):
        want = json.loads((expected / f"{split}_metrics.json").read_text())
        got = json.loads((actual / f"{split}_metrics.json").read_text())
        assert got["confusion_matrix"] == want["confusion_matrix"], split
        for key, value in want.items():
            if isinstance(value, float):
                assert got[key] == pytest.approx(value, abs=METRIC_TOLERANCE), f"{split} {key}: {got[key]} != {value}"
    a, b = weights(expected), weights(actual)
    assert a.keys() == b.keys()
    difference = max((a[name] - b[name]).abs().max().item() for name in a)
    assert difference <= WEIGHT_TOLERANCE, f"weights differ by up to {difference}"


@pytest.fixture(scope="module")
def data(data_root, tmp_path_factory) -> Path:
    return prepared_subset(data_root, tmp_path_factory.mktemp("faults_data"),
                           {"train": (40, 40), "val": (4, 4), "test": (10, 11)}, validation_fraction=0.25)


@pytest.fixture(scope="module")
def unbroken(data, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("unbroken")
    train(RUN + ["--data_dir", str(data), "--output_dir", str(folder / "run")], folder / "hf_home")
    return folder / "run"


def steps(folder: Path) -> list[int]:
    return sorted(int(path.name.split("-")[1]) for path in folder.glob("checkpoint-*"))


# ---- a hard kill in the middle of an epoch, then --resume_from_checkpoint last ---------------------------


def test_sigkill_mid_epoch_then_resume_with_other_worker_counts_matches_the_unbroken_run(data, unbroken, tmp_path):
    """The unbroken run augments in the main process; the killed run in 2 worker processes, its resumption in 1."""
    state = json.loads((unbroken / f"checkpoint-{steps(unbroken)[-1]}" / "trainer_state.json").read_text())
    total, per_epoch = state["global_step"], state["global_step"] / state["epoch"]
    output = tmp_path / "run"
    args = RUN + ["--data_dir", str(data), "--output_dir", str(output)]
    # Kill once checkpoint-12 is complete (trainer_state.json is the last file Trainer writes):
    # step 12 is the 3rd of the 2nd epoch's 9 steps.
    target = output / "checkpoint-12" / "trainer_state.json"
    assert 12 % per_epoch != 0 and 12 < total, (per_epoch, total)
    process = subprocess.Popen([sys.executable, "train_vit.py", *args, "--dataloader_num_workers", "2"], cwd=REPO,
                               env=environment(tmp_path / "hf_home"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    kill_once_written(process, target)
    assert not (output / "test_metrics.json").exists() and not (output / "model.safetensors").exists()
    last = steps(output)[-1]
    assert 12 <= last < total, f"killed at checkpoint {last} of {total} steps"

    resumed = train(args + ["--resume_from_checkpoint", "last", "--dataloader_num_workers", "1"], tmp_path / "hf_home")
    assert "resuming from" in resumed.stdout
    assert_same_results(unbroken, output)


def test_resume_at_an_epoch_boundary_matches_too(data, unbroken, tmp_path):
    # checkpoint-36 closes the 4th epoch (4 x 9 steps): the RNG states are restored before the epoch starts.
    output = tmp_path / "run"
    output.mkdir()
    shutil.copytree(unbroken / "checkpoint-36", output / "checkpoint-36")
    for step in steps(unbroken):
        if step < 36 and (unbroken / f"checkpoint-{step}").is_dir():
            shutil.copytree(unbroken / f"checkpoint-{step}", output / f"checkpoint-{step}")
    train(RUN + ["--data_dir", str(data), "--output_dir", str(output), "--resume_from_checkpoint", "last"],
          tmp_path / "hf_home")
    assert_same_results(unbroken, output)


# ---- broken checkpoint folders ----------------------------------------------------------------------------


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


BREAKAGES = {
    "model.safetensors missing": lambda folder: (folder / "model.safetensors").unlink(),
    "model.safetensors truncated": lambda folder: truncate(folder / "model.safetensors"),
    "model.safetensors header cut": lambda folder: truncate(folder / "model.safetensors", 0.0001),
    "trainer_state.json missing": lambda folder: (folder / "trainer_state.json").unlink(),
    "trainer_state.json truncated": lambda folder: truncate(folder / "trainer_state.json"),
    "trainer_state.json empty": lambda folder: (folder / "trainer_state.json").write_bytes(b""),
    "optimizer.pt missing": lambda folder: (folder / "optimizer.pt").unlink(),
    "optimizer.pt truncated": lambda folder: truncate(folder / "optimizer.pt", 0.9),
    "optimizer.pt empty": lambda folder: (folder / "optimizer.pt").write_bytes(b""),
    "scheduler.pt truncated": lambda folder: truncate(folder / "scheduler.pt"),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_checkpoint_problem_names_the_broken_file(unbroken, tmp_path, breakage):
    from pneumonia_vit.training.trainer import checkpoint_problem

    folder = tmp_path / "checkpoint-12"
    shutil.copytree(unbroken / "checkpoint-12", folder)
    assert checkpoint_problem(folder) is None
    BREAKAGES[breakage](folder)
    problem = checkpoint_problem(folder)
    assert problem is not None and problem.startswith(breakage.split()[0]), problem


def test_last_checkpoint_corrupt_resumes_from_the_one_before(data, unbroken, tmp_path):
    output = tmp_path / "run"
    output.mkdir()
    for step in (8, 12, 16):
        shutil.copytree(unbroken / f"checkpoint-{step}", output / f"checkpoint-{step}")
    truncate(output / "checkpoint-16" / "model.safetensors")
    result = train(RUN + ["--data_dir", str(data), "--output_dir", str(output), "--resume_from_checkpoint", "last"],
                   tmp_path / "hf_home")
    assert f"skipping checkpoint {output / 'checkpoint-16'}: model.safetensors is truncated or corrupt" in result.stdout
    assert f"resuming from {output / 'checkpoint-12'}, the newest complete checkpoint" in result.stdout
    # Not a restart from scratch: the run continued from step 12 and ends like the unbroken one.
    assert_same_results(unbroken, output)


def test_only_checkpoint_corrupt_is_an_error_naming_it(data, unbroken, tmp_path):
    import train_vit

    output = tmp_path / "run"
    output.mkdir()
    shutil.copytree(unbroken / "checkpoint-12", output / "checkpoint-12")
    truncate(output / "checkpoint-12" / "optimizer.pt")
    args = RUN + ["--data_dir", str(data), "--output_dir", str(output)]
    with pytest.raises(CheckpointError, match=r"checkpoint-12 \(optimizer.pt is truncated or corrupt"):
        train_vit.main(args + ["--resume_from_checkpoint", "last"])
    with pytest.raises(CheckpointError, match=r"checkpoint-12: optimizer.pt is truncated or corrupt"):
        train_vit.main(args + ["--resume_from_checkpoint", str(output / "checkpoint-12")])
    # Without --resume_from_checkpoint the leftover checkpoint is an error too, never a silent fresh start.
    with pytest.raises(FileExistsError, match="--resume_from_checkpoint last"):
        train_vit.main(args)
    assert sorted(path.name for path in output.iterdir()) == ["checkpoint-12"]


# ---- the prepared folder changed between data_prep and training -------------------------------------------

QUICK = TINY + ["--max_steps", "1", "--per_device_train_batch_size", "8", "--eval_strategy", "no",
                "--save_strategy", "no", "--early_stopping_patience", "0"]


@pytest.fixture
def changed(data, tmp_path) -> Path:
    copy = tmp_path / "prepared"
    shutil.copytree(data, copy)
    return copy


def test_lost_image_is_an_error_naming_it(changed, tmp_path):
    import train_vit

    lost = sorted((changed / "validation" / "PNEUMONIA").iterdir())[0]
    lost.unlink()
    with pytest.raises(FileNotFoundError, match=f"gone: {lost}"):
        train_vit.main(QUICK + ["--data_dir", str(changed), "--output_dir", str(tmp_path / "run")])


def test_gained_files_are_named_in_warnings_and_images_are_used(changed, tmp_path, capsys):
    import train_vit

    normal = changed / "train" / "NORMAL"
    before = len(list(normal.iterdir()))
    (normal / "notes.txt").write_text("checked by Dr X\n")
    (normal / ".DS_Store").write_bytes(b"\0" * 16)  # hidden: imagefolder ignores it, so does the check
    extra = normal / "added-by-hand.png"
    shutil.copy(sorted((changed / "test" / "NORMAL").iterdir())[0], extra)
    with pytest.warns(UserWarning) as caught:
        train_vit.main(QUICK + ["--data_dir", str(changed), "--output_dir", str(tmp_path / "run")])
    messages = [str(warning.message) for warning in caught]
    assert any("non-image" in message and str(normal / "notes.txt") in message for message in messages), messages
    assert any("will be used" in message and str(extra) in message for message in messages), messages
    assert not any(".DS_Store" in message for message in messages), messages
    assert f"train {{0: {before + 1}," in capsys.readouterr().out  # the extra image was trained on


@pytest.mark.parametrize("name, content, message", [
    ("broken.png", b"not a png at all", "training would fail on it"),
    ("metadata.csv", b"file_name,label\n", "imagefolder would read this"),
])
def test_gained_file_that_would_break_training_is_an_error(changed, tmp_path, name, content, message):
    import train_vit

    path = changed / "train" / "PNEUMONIA" / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as error:
        train_vit.main(QUICK + ["--data_dir", str(changed), "--output_dir", str(tmp_path / "run")])
    assert str(path) in str(error.value)
