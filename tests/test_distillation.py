"""Knowledge distillation from a CNN teacher (training.DistillationTrainer): the token-similarity term on
random tensors, the loss as the sum of its parts on a real batch (with and without DeiT's distillation
token), and train_vit.py with a teacher folder."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_vit import TINY_VIT

from pneumonia_vit.ood.check import STATS_FILE
from pneumonia_vit.training.trainer import token_similarity_loss

REPO = Path(__file__).resolve().parent.parent
TEACHER_CONFIG = REPO / "configs" / "resnet_teacher"


def _tokens_from(cells: torch.Tensor, width: int, seed: int) -> torch.Tensor:
    """ViT-shaped tokens (a [CLS] token, then one per cell) that are the cells rotated into `width`
    dimensions, scaled and shifted: the same pairwise similarities as the cells."""
    generator = torch.Generator().manual_seed(seed)
    rotation = torch.linalg.qr(torch.randn(width, cells.shape[1], generator=generator))[0].T  # orthonormal rows
    patch_tokens = 3.0 * cells.flatten(2).transpose(1, 2) @ rotation + 5.0
    return torch.cat([torch.randn(cells.shape[0], 1, width, generator=generator), patch_tokens], dim=1)


def test_token_similarity_loss_ignores_rotation_and_scale_but_not_layout():
    cells = torch.randn(3, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    tokens = _tokens_from(cells, width=16, seed=1)
    matched = token_similarity_loss(tokens, (cells,))
    assert matched.shape == (3,)
    assert matched.max() < 1e-6

    shuffled = torch.cat([tokens[:, :1], tokens[:, 1:][:, torch.randperm(16, generator=torch.Generator().manual_seed(2))]], dim=1)
    assert token_similarity_loss(shuffled, (cells,)).min() > 0.05


def test_token_similarity_loss_pools_the_deepest_map_at_least_as_fine_as_the_tokens():
    generator = torch.Generator().manual_seed(0)
    fine, coarse = torch.randn(2, 8, 8, 8, generator=generator), torch.randn(2, 16, 2, 2, generator=generator)
    tokens = _tokens_from(F.adaptive_avg_pool2d(fine, 4), width=16, seed=1)  # a 4 x 4 grid
    assert token_similarity_loss(tokens, (fine, coarse)).max() < 1e-6  # the 2 x 2 map is too coarse: unused
    with pytest.raises(ValueError, match="at least as fine"):
        token_similarity_loss(tokens, (coarse,))
    with pytest.raises(ValueError, match="square token grid"):
        token_similarity_loss(tokens[:, :-1], (fine,))


@pytest.fixture(scope="module")
def student_and_teacher():
    from transformers import AutoConfig, AutoModelForImageClassification, ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    student_config = ViTConfig(num_labels=2)
    student_config.update_from_string(TINY_VIT)
    teacher = AutoModelForImageClassification.from_config(AutoConfig.from_pretrained(TEACHER_CONFIG, num_labels=2))
    return ViTForImageClassification(student_config), teacher


def _batch() -> dict:
    return {"pixel_values": torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(3)),
            "labels": torch.tensor([0, 1, 1, 0])}


def _soft_label_term(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per image: the temperature-scaled KL divergence DistillationTrainer should add, written out."""
    return temperature ** 2 * F.kl_div(F.log_softmax(logits / temperature, -1), F.log_softmax(teacher_logits / temperature, -1),
                                       log_target=True, reduction="none").sum(-1)


WEIGHT, TEMPERATURE, TOKEN_WEIGHT = 0.7, 2.0, 1.5


def _training_loss(student, teacher, output_dir: Path, **trainer_kwargs):
    """DistillationTrainer's training loss on _batch() (WEIGHT, TEMPERATURE, TOKEN_WEIGHT), the trainer, the batch and
    both models' outputs on it."""
    from transformers import TrainingArguments

    from pneumonia_vit.training.trainer import DistillationTrainer

    trainer = DistillationTrainer(model=student, args=TrainingArguments(output_dir=str(output_dir), use_cpu=True, report_to="none"),
                                  teacher=teacher, weight=WEIGHT, temperature=TEMPERATURE, token_weight=TOKEN_WEIGHT,
                                  **trainer_kwargs)
    inputs = _batch()
    student.train()
    loss = trainer.compute_loss(student, dict(inputs))
    with torch.no_grad():
        student_out = student(pixel_values=inputs["pixel_values"], output_hidden_states=True)
        teacher_out = teacher.eval()(pixel_values=inputs["pixel_values"], output_hidden_states=True)
    return loss, trainer, inputs, student_out, teacher_out


def test_distillation_loss_is_the_weighted_sum_of_label_soft_label_and_token_terms(student_and_teacher, tmp_path):
    loss, trainer, inputs, student_out, teacher_out = _training_loss(*student_and_teacher, tmp_path)
    student = student_and_teacher[0]
    label = F.cross_entropy(student_out.logits, inputs["labels"])
    soft = _soft_label_term(student_out.logits, teacher_out.logits, TEMPERATURE)
    tokens = token_similarity_loss(student_out.hidden_states[-2], teacher_out.hidden_states)
    expected = (1 - WEIGHT) * label + (WEIGHT * soft + TOKEN_WEIGHT * tokens).mean()
    assert tokens.min() > 0
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)

    student.eval()  # evaluation: the label loss alone
    assert trainer.compute_loss(student, dict(inputs)).item() == pytest.approx(label.item(), rel=1e-5)


def test_a_calibrated_teacher_is_distilled_from_the_logits_it_learned(student_and_teacher, tmp_path):
    """train_vit.py folds a calibration into every model it saves, a teacher included: the distillation terms
    undo it, so the recipe's soft labels are those of the teacher as it was trained."""
    import copy

    from pneumonia_vit.inference.calibration import fold

    student, teacher = student_and_teacher
    calibrated = copy.deepcopy(teacher)
    fold(calibrated, 3.0, -1.5)
    calibrated.config.calibration = {"slope": 3.0, "intercept": -1.5}
    with torch.no_grad():
        assert not torch.allclose(calibrated.eval()(pixel_values=_batch()["pixel_values"]).logits.softmax(-1),
                                  teacher.eval()(pixel_values=_batch()["pixel_values"]).logits.softmax(-1), atol=1e-3)
    reference = _training_loss(student, teacher, tmp_path)[0]
    assert _training_loss(student, calibrated, tmp_path)[0].item() == pytest.approx(reference.item(), rel=1e-5)


@pytest.fixture(scope="module")
def trained_teacher(small_prepared, tmp_path_factory) -> Path:
    """A tiny CNN teacher trained by train_vit.py from the teacher config folder."""
    import train_vit

    teacher_dir = tmp_path_factory.mktemp("teacher")
    train_vit.main(["--config_name", str(TEACHER_CONFIG), "--image_size", "64", "--output_dir", str(teacher_dir),
                    *_common(small_prepared)])
    return teacher_dir


def _common(data_dir: Path) -> list[str]:
    return ["--data_dir", str(data_dir), "--use_cpu", "--report_to", "none", "--num_train_epochs", "1",
            "--per_device_train_batch_size", "8", "--eval_strategy", "epoch", "--save_strategy", "no",
            "--disable_tqdm", "true"]


def test_train_vit_distils_from_a_teacher_folder_and_saves_only_the_vit(small_prepared, trained_teacher, tmp_path):
    """A tiny ViT distilled from the tiny teacher: the saved model holds exactly a ViT classifier's weights,
    none of the teacher's."""
    from safetensors import safe_open
    from transformers import ViTForImageClassification

    import train_vit

    student_dir = tmp_path / "student"
    train_vit.main(["--config_overrides", TINY_VIT, "--teacher_name_or_path", str(trained_teacher),
                    "--distillation_weight", "0.9", "--token_distillation_weight", "1.0",
                    "--output_dir", str(student_dir), *_common(small_prepared)])

    assert json.loads((student_dir / "config.json").read_text())["model_type"] == "vit"
    with safe_open(str(student_dir / "model.safetensors"), "pt") as saved:
        saved_count = len(list(saved.keys()))
    student, loading = ViTForImageClassification.from_pretrained(student_dir, output_loading_info=True)
    assert not any(loading[problem] for problem in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert saved_count == len(student.state_dict())  # no teacher tensor rode along


def test_distillation_token_takes_the_teacher_terms_and_cls_head_the_labels(student_and_teacher, tmp_path):
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    from pneumonia_vit.training.trainer import weighted_loss

    _, teacher = student_and_teacher
    config = DeiTConfig(num_labels=2)
    config.update_from_string(TINY_VIT)
    torch.manual_seed(0)
    student = DeiTForImageClassificationWithTeacher(config)
    loss, _, inputs, out, teacher_out = _training_loss(student, teacher, tmp_path,
                                                       compute_loss_func=weighted_loss(Counter({0: 1, 1: 1}), 0.0))
    assert out.hidden_states[-2].shape[1] == 2 + 16  # [CLS], distillation token, 4 x 4 patches
    label = F.cross_entropy(out.cls_logits, inputs["labels"])
    soft = _soft_label_term(out.distillation_logits, teacher_out.logits, TEMPERATURE)
    tokens = token_similarity_loss(out.hidden_states[-2], teacher_out.hidden_states, special_tokens=2)
    expected = (1 - WEIGHT) * label + (WEIGHT * soft + TOKEN_WEIGHT * tokens).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    mean_head = F.cross_entropy(out.logits, inputs["labels"])
    assert abs(label.item() - mean_head.item()) > 1e-4  # the heads differ, so the test tells them apart


def test_train_vit_with_a_distillation_token_saves_a_deit_the_auto_classes_load(small_prepared, trained_teacher, tmp_path):
    """`--model_type deit --distillation_token`: the saved model loads back through the Auto classes as the
    two-headed DeiT, whose logits (what Trainer.predict scored) are the mean of the heads."""
    from transformers import AutoModelForImageClassification, DeiTForImageClassificationWithTeacher

    import train_vit

    student_dir = tmp_path / "deit"
    results = train_vit.main(["--model_type", "deit", "--distillation_token", "--config_overrides", TINY_VIT,
                              "--teacher_name_or_path", str(trained_teacher), "--token_distillation_weight", "1.0",
                              "--output_dir", str(student_dir), *_common(small_prepared)])
    assert 0.0 <= results["test"]["roc_auc"] <= 1.0
    assert (student_dir / STATS_FILE).is_file()  # the out-of-domain statistics read its [CLS] head's input

    model, loading = AutoModelForImageClassification.from_pretrained(student_dir, output_loading_info=True)
    assert isinstance(model, DeiTForImageClassificationWithTeacher)
    assert not any(loading[problem] for problem in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    with torch.no_grad():
        out = model.eval()(pixel_values=torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4)))
    torch.testing.assert_close(out.logits, (out.cls_logits + out.distillation_logits) / 2)

    import evaluate_vit  # scores the two heads' mean although the model returns no loss of its own

    metrics = evaluate_vit.main(["--model", str(student_dir), "--data_dir", str(small_prepared), "--split", "test",
                                 "--output_dir", str(tmp_path / "evaluation")])
    assert metrics["confusion_matrix"] == results["test"]["confusion_matrix"]
    assert metrics["roc_auc"] == pytest.approx(results["test"]["roc_auc"], abs=1e-6)

    fresh, _ = train_vit.build_model(train_vit.ModelArguments(model_type="deit", distillation_token=True, config_overrides=TINY_VIT,
                                                              teacher_name_or_path=str(trained_teacher)))
    embeddings = fresh.deit.embeddings  # started as ViT starts them, not at zero (transformers 5.24)
    assert 0.01 < embeddings.position_embeddings.std().item() < 0.03
    assert not torch.equal(embeddings.cls_token, embeddings.distillation_token)

    with pytest.raises(ValueError, match="needs a DeiT"):
        train_vit.main(["--distillation_token", "--config_overrides", TINY_VIT, "--teacher_name_or_path",
                        str(trained_teacher), "--output_dir", str(tmp_path / "vit"), *_common(small_prepared)])


def test_a_deit_without_the_distillation_token_is_the_one_head_class_and_loads_back_as_it(tmp_path):
    """transformers 5 maps "deit" to two classes; from scratch (no config.architectures) its Auto class used to
    raise a TypeError for `--model_type deit` alone."""
    from transformers import AutoModelForImageClassification, DeiTForImageClassification

    import train_vit

    model, _ = train_vit.build_model(train_vit.ModelArguments(model_type="deit", config_overrides=TINY_VIT))
    assert type(model) is DeiTForImageClassification
    assert 0.01 < model.deit.embeddings.position_embeddings.std().item() < 0.03
    model.save_pretrained(tmp_path)
    assert type(AutoModelForImageClassification.from_pretrained(tmp_path)) is DeiTForImageClassification
