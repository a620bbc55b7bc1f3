"""train_vit.py's settings and reloads without a training run to share: config files and flags, the augmentation
flags' one declaration, refusals before training, and the best-checkpoint reload every layer needs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny_vit import TINY_VIT


def _reload_into_a_fresh_model(trainer_class, model_dir, output_dir):
    """A differently initialised copy of the model in `model_dir`, after `trainer_class` reloads the best checkpoint."""
    import torch
    from transformers import TrainingArguments, ViTConfig, ViTForImageClassification

    torch.manual_seed(1)
    model = ViTForImageClassification(ViTConfig.from_pretrained(model_dir))
    trainer = trainer_class(model=model, args=TrainingArguments(output_dir=str(output_dir), use_cpu=True, report_to="none"))
    trainer.state.best_model_checkpoint = str(model_dir)
    trainer._load_best_model()
    return trainer.model.state_dict()


def test_best_checkpoint_reload_restores_every_layer(tiny_model_dir, tmp_path):
    """transformers 5 saves ViT weights under legacy names; Trainer's own reload would leave the encoder
    blocks as they were (strict=False). StrictReloadTrainer must restore every tensor of the checkpoint."""
    import torch
    from transformers import ViTForImageClassification

    from pneumonia_vit.training.trainer import StrictReloadTrainer

    saved = ViTForImageClassification.from_pretrained(tiny_model_dir).state_dict()
    for name, value in _reload_into_a_fresh_model(StrictReloadTrainer, tiny_model_dir, tmp_path).items():
        assert torch.equal(value, saved[name]), name


def test_stock_trainer_still_drops_encoder_weights_on_reload(tiny_model_dir, tmp_path):
    """huggingface/transformers#43701 is still there. When this fails, upstream has fixed it: remove the two
    reload overrides of training.StrictReloadTrainer (and this test)."""
    import torch
    from transformers import Trainer, ViTForImageClassification

    saved = ViTForImageClassification.from_pretrained(tiny_model_dir).state_dict()
    reloaded = _reload_into_a_fresh_model(Trainer, tiny_model_dir, tmp_path)
    assert torch.equal(reloaded["classifier.weight"], saved["classifier.weight"])  # what stock Trainer does load
    stale = [name for name, value in reloaded.items() if "layers" in name and not torch.equal(value, saved[name])]
    assert stale, "stock Trainer now reloads every encoder weight: upstream fixed #43701"


def test_resume_last_without_checkpoints_is_refused(small_prepared, tmp_path):
    import train_vit

    with pytest.raises(FileNotFoundError, match="no checkpoint-\\* folder"):
        train_vit.main(["--data_dir", str(small_prepared), "--output_dir", str(tmp_path),
                        "--resume_from_checkpoint", "last", "--use_cpu", "--report_to", "none"])


def test_config_files_yaml_json_and_typos(tmp_path):
    import train_vit

    (tmp_path / "run.yaml").write_text("config_overrides: hidden_size=48\nlearning_rate: 3.0e-4\nnum_train_epochs: 4\n")
    args = train_vit.parse_arguments(
        [str(tmp_path / "run.yaml"), "--learning_rate", "0.01", "--output_dir", str(tmp_path / "out")])
    assert args.model.model_name_or_path is None and args.model.config_overrides == "hidden_size=48"
    assert args.training.learning_rate == 0.01  # the command line wins
    assert args.training.num_train_epochs == 4  # the file still counts where the command line is silent
    assert args.training.output_dir == str(tmp_path / "out")

    (tmp_path / "run.json").write_text(json.dumps({"threshold_rule": "min_sensitivity", "min_sensitivity": 0.9}))
    threshold = train_vit.parse_arguments([str(tmp_path / "run.json")]).threshold
    assert (threshold.threshold_rule, threshold.min_sensitivity) == ("min_sensitivity", 0.9)

    (tmp_path / "typo.yaml").write_text("model_type: vit\nlearnin_rate: 0.01\n")
    with pytest.raises(ValueError, match="unknown setting\\(s\\) learnin_rate"):
        train_vit.parse_arguments([str(tmp_path / "typo.yaml")])
    (tmp_path / "rule.yaml").write_text("threshold_rule: f1\n")  # a file's value is checked as a flag's is
    with pytest.raises(ValueError, match="threshold rule must be one of"):
        train_vit.parse_arguments([str(tmp_path / "rule.yaml")])


def test_the_augmentation_flags_are_one_declaration_shared_by_train_vit_and_pretrain_mae():
    """Augmentation is parsed as it is declared: every field a flag of both scripts, with its default."""
    import dataclasses

    import pretrain_mae
    import train_vit
    from pneumonia_vit.training.data import Augmentation

    flags = ["--crop_scale", "0.35", "--zoom_out", "1.3", "--jpeg_quality", "50"]
    expected = Augmentation(crop_scale=0.35, zoom_out=1.3, jpeg_quality=50)
    assert train_vit.parse_arguments(flags).augmentation == expected
    assert pretrain_mae.parse_arguments(flags)[2] == expected
    for field in dataclasses.fields(Augmentation):
        assert field.metadata["help"], field.name


def test_persistent_workers_are_refused_since_they_would_repeat_the_first_epochs_augmentation(small_prepared, tmp_path):
    import train_vit

    with pytest.raises(ValueError, match="dataloader_persistent_workers is not supported"):
        train_vit.main(["--config_overrides", TINY_VIT, "--data_dir", str(small_prepared), "--output_dir", str(tmp_path),
                        "--use_cpu", "--report_to", "none", "--dataloader_num_workers", "1",
                        "--dataloader_persistent_workers", "true"])


def test_zoom_out_puts_a_dark_margin_around_half_of_the_films_and_is_off_by_default(data_root):
    """The crops alone leave the dark margin a class cue (more of it around NORMAL films); zooming out varies
    it for both classes. Off by default, so a config without it draws exactly the augmentations it drew before."""
    from pneumonia_vit.images import load_xray
    from pneumonia_vit.training.data import Augmentation

    film = load_xray(sorted((data_root / "chest_xray_224" / "train" / "PNEUMONIA").iterdir())[0])
    # Only the margin varies: no crop, no aspect change, no rotation, no photometric change.
    plain = {"crop_scale": 1.0, "aspect_jitter": 1.0, "rotation_degrees": 0.0, "gamma": 0.0, "exposure": 0.0,
             "blur": 0.2, "noise": 0.0, "jpeg_quality": 95}

    def draws(augmentation: Augmentation) -> list[np.ndarray]:
        return [np.asarray(augmentation(film, 64, np.random.default_rng((0, 0, index))), dtype=np.uint8)
                for index in range(40)]

    def black_edge_rows_and_columns(pixels: np.ndarray) -> int:
        black = pixels <= 2
        return int(black.all(axis=1).sum() + black.all(axis=0).sum())

    zoomed = draws(Augmentation(**plain, zoom_out=1.5))
    margins = [black_edge_rows_and_columns(pixels) for pixels in zoomed]
    assert all(pixels.shape == (64, 64) for pixels in zoomed)
    assert 10 <= sum(margin > 0 for margin in margins) <= 30  # about half of the draws
    assert max(margins) >= 8  # up to a third of the side on a 1.5x canvas: well beyond a resampling edge
    assert not any(black_edge_rows_and_columns(pixels) for pixels in draws(Augmentation(**plain)))
    default_draws = draws(Augmentation())
    assert all((a == b).all() for a, b in zip(default_draws, draws(Augmentation(zoom_out=1.0))))
