"""`train_vit.py --push_to_hub`: what reaches the Hub, checked against a local stand-in of the Hub API
(tests/hub_standin.py, the one mock of this suite: nothing can reach huggingface.co from here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hub_standin import HubStandIn
from tiny_vit import TINY_VIT

REPO = Path(__file__).resolve().parent.parent
REPO_ID = "user/pneumonia-test"
TINY_FLAGS = [
    "--config_overrides", TINY_VIT, "--use_cpu", "--per_device_train_batch_size", "8",
    "--eval_strategy", "epoch", "--save_strategy", "epoch", "--load_best_model_at_end",
    "--metric_for_best_model", "roc_auc", "--report_to", "none", "--disable_tqdm", "true",
]


@pytest.fixture(scope="module")
def pushed(small_prepared, tmp_path_factory):
    folder = tmp_path_factory.mktemp("push")
    output = folder / "run"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGING_FACE"))}
    with HubStandIn() as hub:
        env.update(
            HF_ENDPOINT=hub.endpoint,  # read once at import by huggingface_hub: hence the subprocess
            HF_HOME=str(folder / "hf_home"),  # no saved token or cache of the machine's user
            HF_DATASETS_OFFLINE="1",  # the prepared folder is local; HF_HUB_OFFLINE would block the push
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_EVALUATE_OFFLINE="1",
        )
        result = subprocess.run(
            [sys.executable, "train_vit.py", *TINY_FLAGS, "--data_dir", str(small_prepared), "--output_dir", str(output),
             "--num_train_epochs", "2", "--push_to_hub", "--hub_model_id", REPO_ID, "--hub_token", "dummy"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=400,
        )
    assert result.returncode == 0, (
        f"train_vit.py --push_to_hub exited with {result.returncode}\n--- stderr (end) ---\n{result.stderr[-4000:]}"
        f"\n--- stand-in: unexpected {hub.unexpected}, last requests {hub.requests[-8:]}"
    )
    return {"hub": hub, "output": output, "folder": folder, "log": result.stdout + result.stderr}


def test_push_reached_the_hub_with_the_token(pushed):
    hub = pushed["hub"]
    assert hub.unexpected == [], hub.unexpected
    assert list(hub.repos) == [("model", REPO_ID)]
    repo = hub.repo(REPO_ID)
    assert repo.commits, "nothing was committed"
    # Trainer pushes at every save (hub_strategy every_save), then the final model: at least 2 commits.
    assert len(repo.commits) >= 2
    posts = [(method, path, auth) for method, path, auth in hub.requests if method == "POST"]
    assert any(path == "/api/repos/create" for _, path, _ in posts)
    assert any(path == f"/api/models/{REPO_ID}/commit/main" for _, path, _ in posts)
    assert {auth for _, _, auth in posts} == {"Bearer dummy"}


def test_pushed_files_equal_the_local_model(pushed):
    repo, output = pushed["hub"].repo(REPO_ID), pushed["output"]
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md",
                 "test_metrics.json", "validation_metrics.json"):
        assert name in repo.files, f"{name} was not pushed; got {sorted(repo.files)}"
        assert repo.files[name] == (output / name).read_bytes(), f"{name} differs from the local file"
    config = json.loads(repo.files["config.json"])
    assert 0 < config["decision_threshold"] < 1 and config["threshold_rule"] == "youden"
    assert json.loads(repo.files["preprocessor_config.json"])["size"] == {"height": 64, "width": 64}


def test_pushed_card_is_ours_not_the_trainer_generic_one(pushed):
    repo, output = pushed["hub"].repo(REPO_ID), pushed["output"]
    card = repo.files["README.md"].decode()
    assert card.startswith("---\nlicense: cc-by-4.0\n")
    assert "not a medical device" in card and "Kermany" in card and "decision_threshold" in card
    assert "generated from the trainer" not in card.lower() and "More information needed" not in card
    # No commit ever carried another README (Trainer writes its own card during push_to_hub).
    readmes = {commit.added["README.md"] for commit in repo.commits if "README.md" in commit.added}
    assert readmes == {(output / "README.md").read_bytes()}


def test_no_checkpoints_or_private_files_pushed(pushed):
    repo = pushed["hub"].repo(REPO_ID)
    every_path = {path for commit in repo.commits for path in commit.added} | set(repo.files)
    assert not [path for path in every_path if path.startswith(("checkpoint-", "_", "last-checkpoint"))]
    assert len(list(pushed["output"].glob("checkpoint-*"))) == 2  # they were there to be pushed


def test_pushed_model_loads_and_scores_like_the_local_one(pushed, tmp_path):
    import torch
    from transformers import AutoImageProcessor, ViTForImageClassification

    repo, output = pushed["hub"].repo(REPO_ID), pushed["output"]
    for name, data in repo.files.items():
        (tmp_path / name).write_bytes(data)
    remote = ViTForImageClassification.from_pretrained(tmp_path).eval()
    local = ViTForImageClassification.from_pretrained(output).eval()
    assert remote.config.decision_threshold == local.config.decision_threshold
    for name, value in local.state_dict().items():
        assert torch.equal(value, remote.state_dict()[name]), name
    assert AutoImageProcessor.from_pretrained(tmp_path, backend="pil").size == {"height": 64, "width": 64}
