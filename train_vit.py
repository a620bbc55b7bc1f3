"""Fine-tune (or train from scratch) a model that tells NORMAL from PNEUMONIA chest X-rays (the recipes: README.md,
Training; configs/accelerate/ for several GPUs).

    python train_vit.py configs/vit_tiny_cpu.yaml --data_dir data/chest_xray_prepared --resume_from_checkpoint last

A YAML or JSON file given first sets defaults; any --flag after it overrides them (every `TrainingArguments` flag).
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, get_type_hints

import torch
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    EarlyStoppingCallback,
    TrainingArguments,
    set_seed,
)

from pneumonia_vit.images import LABELS
from pneumonia_vit.inference.calibration import Calibration, calibrate_operating_point, reliability_diagram
from pneumonia_vit.inference.classifier import load_pixel_spec
from pneumonia_vit.ood.fit import add_domain_check
from pneumonia_vit.preprocess import PixelSpec
from pneumonia_vit.serving.service import DEFAULT_MODEL
from pneumonia_vit.training.card import model_card
from pneumonia_vit.training.data import Augmentation, BatchTransform, collate, load_splits, with_sample_index
from pneumonia_vit.training.evaluation import ThresholdPolicy, operating_point, predict_scores, write_report
from pneumonia_vit.training.trainer import (
    AugmentationEpoch,
    DistillationTrainer,
    RunArguments,
    Stopwatch,
    StrictReloadTrainer,
    average_last_checkpoints,
    check_averaging_possible,
    compute_metrics,
    parse_with_config_file,
    resume_checkpoint,
    weighted_loss,
)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": (
        "Pretrained model to fine-tune: a Hub id (google/vit-base-patch16-224-in21k) or a local folder (e.g. what "
        "pretrain_mae.py wrote). Leave unset to train from scratch from the config below.")})
    config_name: str | None = field(default=None, metadata={"help": "Config to build the model from, a Hub id or folder, if not the pretrained model's."})
    model_type: str = field(default="vit", metadata={"help": "From scratch without --config_name: the architecture, with its default config."})
    config_overrides: str | None = field(default=None, metadata={"help": (
        "Comma-separated settings over the config, e.g. image_size=128,patch_size=8,hidden_size=192,num_hidden_layers=6,"
        "num_attention_heads=3,intermediate_size=768,hidden_dropout_prob=0.1")})
    image_size: int | None = field(default=None, metadata={"help": "From scratch: input side in pixels, for architectures whose config has none (CNNs)."})
    teacher_name_or_path: str | None = field(default=None, metadata={"help": (
        "A trained classifier (e.g. a CNN from configs/resnet_teacher_cpu.yaml) whose probabilities the model also "
        "learns to match on every augmented training image (soft knowledge distillation).")})
    distillation_weight: float = field(default=0.5, metadata={"help": "With a teacher: the loss is (1 - w) x label loss + w x distillation loss."})
    distillation_temperature: float = field(default=2.0, metadata={"help": "With a teacher: softmax temperature of both models' logits."})
    token_distillation_weight: float = field(default=0.0, metadata={"help": (
        "With a teacher: weight of a second distillation term, added to the label loss, in which the ViT's patch tokens "
        "match the similarities between the teacher's feature-map cells (training.token_similarity_loss). 0 = off.")})
    distillation_token: bool = field(default=False, metadata={"help": (
        "With a teacher and --model_type deit: DeiT's distillation token (Touvron et al. 2021). The teacher's terms train "
        "a head on a token of its own, the labels the [CLS] head; the model's logits are the mean of the two heads.")})


@dataclass
class DataArguments:
    data_dir: str | None = field(default=None, metadata={"help": "Folder written by data_prep/prepare.py (train/, validation/, test/)."})
    dataset_name: str | None = field(default=None, metadata={"help": (
        "Hub dataset with train/validation/test splits and NORMAL/PNEUMONIA labels, instead of --data_dir.")})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only this many training images (quick runs)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only this many validation and test images each (quick runs)."})
    augment: bool = field(default=True, metadata={"help": "Augment the training images with the flags below (Augmentation)."})


@dataclass
class FitArguments:
    class_weighted_loss: bool = field(default=True, metadata={"help": "Weight the loss by inverse class frequency (train has 2.9x more PNEUMONIA)."})
    early_stopping_patience: int = field(default=5, metadata={"help": "Stop after this many evaluations without a better validation score (0: never)."})
    average_last_checkpoints: int = field(default=0, metadata={"help": (
        "After training, replace the model by the average of the last N checkpoints' weights (SWA), before the "
        "threshold is chosen. Needs save_total_limit >= N + 1 with load_best_model_at_end. 0 = off: the best stays.")})


class Arguments(NamedTuple):
    model: ModelArguments
    data: DataArguments
    augmentation: Augmentation
    threshold: ThresholdPolicy
    fit: FitArguments
    run: RunArguments
    training: TrainingArguments


def parse_arguments(argv: list[str]) -> Arguments:
    return Arguments(*parse_with_config_file(get_type_hints(Arguments).values(), argv, "train_vit.py"))


def build_model(model_args: ModelArguments):
    """The classifier and the pixel spec it expects: pretrained weights to fine-tune, or a new model from a config."""
    labels = {"num_labels": len(LABELS), "id2label": dict(enumerate(LABELS)), "label2id": {label: i for i, label in enumerate(LABELS)}}
    source = model_args.config_name or model_args.model_name_or_path
    config = AutoConfig.from_pretrained(source, **labels) if source else AutoConfig.for_model(model_args.model_type, **labels)
    if model_args.config_overrides:
        config.update_from_string(model_args.config_overrides)
    config.__dict__.pop("calibration", None)  # a calibrated source's map does not hold for the model trained here
    if model_args.distillation_token:
        if config.model_type != "deit" or not model_args.teacher_name_or_path:
            raise ValueError("--distillation_token needs a DeiT (--model_type deit) and a --teacher_name_or_path")
        config.architectures = ["DeiTForImageClassificationWithTeacher"]  # the class the Auto classes build and load back
        config.keys_to_ignore_at_inference = ["cls_logits", "distillation_logits"]  # Trainer.predict: the mean only
    elif config.model_type == "deit":
        # transformers 5 maps "deit" to two classes and picks one by config.architectures (None from scratch: a
        # TypeError); without the token it is the one-head class, also when fine-tuning a distilled checkpoint.
        config.architectures = ["DeiTForImageClassification"]
    if model_args.model_name_or_path is None:
        model = AutoModelForImageClassification.from_config(config)
        if config.model_type == "deit":
            # transformers 5.24 starts DeiT's position embeddings and both tokens at zero, so [CLS] and the distillation
            # token would begin identical; they start as in DeiT's own code and in ViT: truncated normal.
            embeddings = model.deit.embeddings
            for start in (embeddings.position_embeddings, embeddings.cls_token, embeddings.distillation_token):
                torch.nn.init.trunc_normal_(start, std=config.initializer_range)
        return model, PixelSpec(size=model_args.image_size or config.image_size)
    # A pretrained classifier's head has another number of classes (ImageNet's): it is replaced.
    model = AutoModelForImageClassification.from_pretrained(model_args.model_name_or_path, config=config, ignore_mismatched_sizes=True)
    return model, load_pixel_spec(model_args.model_name_or_path)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    checkpoint = prepare_run(args)
    splits = load_data(args.data, args.training)
    model, spec = build_model(args.model)
    class_counts = Counter(splits["train"]["label"])  # read before set_transform, which would decode every image
    train_transform = set_transforms(splits, spec, args.augmentation if args.data.augment else None, args.training.seed)
    trainer, stopwatch = build_trainer(args, model, spec, splits, class_counts, train_transform)
    train(trainer, model, stopwatch, checkpoint, args, len(splits["train"]))
    return finish(trainer, model, spec, splits, class_counts, args, command="python train_vit.py " + " ".join(argv))


def prepare_run(args: Arguments) -> str | None:
    """The Trainer settings this script relies on, the settings refused before any training, the seed; returns
    the checkpoint to resume from."""
    training_args = args.training
    training_args.remove_unused_columns = False  # the transforms read the "image" column
    training_args.label_names = ["labels"]  # collate's key; Trainer guesses it from forward(), which DeiT's two-head model lacks
    training_args.restore_callback_states_from_checkpoint = True  # a resumed run keeps its early-stopping patience count
    checkpoint = resume_checkpoint(training_args, args.run.overwrite_output_dir)
    check_averaging_possible(args.fit.average_last_checkpoints, training_args)
    set_seed(training_args.seed)
    return checkpoint


def load_data(data_args: DataArguments, training_args: TrainingArguments):
    """The prepared imagefolder (or Hub dataset), optionally cut down for quick runs."""
    with training_args.main_process_first():
        splits = load_splits(data_args.data_dir, data_args.dataset_name)
    limits = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples, "test": data_args.max_eval_samples}
    for name, limit in limits.items():
        if limit is not None and limit < len(splits[name]):
            splits[name] = splits[name].shuffle(seed=training_args.seed).select(range(limit))
    return splits


def set_transforms(splits, spec: PixelSpec, augmentation: Augmentation | None, seed: int) -> BatchTransform:
    """Decoding (and augmenting the training split) on the fly; returns the training transform."""
    train_transform = BatchTransform(spec, augmentation, seed=seed)
    splits["train"] = with_sample_index(splits["train"])
    splits["train"].set_transform(train_transform)
    for name in ("validation", "test"):
        splits[name].set_transform(BatchTransform(spec))
    return train_transform


def build_trainer(args: Arguments, model, spec: PixelSpec, splits, class_counts: Counter, train_transform: BatchTransform):
    """The Trainer (with distillation from --teacher_name_or_path) and the stopwatch that times it."""
    model_args, fit_args, training_args = args.model, args.fit, args.training
    stopwatch = Stopwatch(args.run.max_train_minutes)
    callbacks = [stopwatch, AugmentationEpoch(train_transform)]
    if fit_args.early_stopping_patience and training_args.load_best_model_at_end:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=fit_args.early_stopping_patience))
    trainer_class = StrictReloadTrainer
    if model_args.teacher_name_or_path:
        trainer_class = functools.partial(
            DistillationTrainer, teacher=AutoModelForImageClassification.from_pretrained(model_args.teacher_name_or_path),
            weight=model_args.distillation_weight, temperature=model_args.distillation_temperature,
            token_weight=model_args.token_distillation_weight,
        )
    loss_counts = class_counts if fit_args.class_weighted_loss else Counter({0: 1, 1: 1})
    trainer = trainer_class(
        model=model, args=training_args, data_collator=collate, train_dataset=splits["train"],
        eval_dataset=splits["validation"], processing_class=spec.processor(),
        compute_loss_func=weighted_loss(loss_counts, training_args.label_smoothing_factor),
        compute_metrics=compute_metrics, callbacks=callbacks,
    )
    if trainer.is_world_process_zero():
        batch, world, accumulation = (training_args.per_device_train_batch_size, training_args.world_size,
                                      training_args.gradient_accumulation_steps)
        print(f"effective batch size {batch * world * accumulation} = {batch} per device x {world} processes x "
              f"{accumulation} accumulation steps; train {dict(sorted(class_counts.items()))}, "
              f"validation {len(splits['validation'])}, test {len(splits['test'])}")
    return trainer, stopwatch


def train(trainer, model, stopwatch: Stopwatch, checkpoint: str | None, args: Arguments, train_size: int) -> None:
    """Trains (or resumes), keeping the checkpoint with the best validation score; writes run_stats.json; with
    --average_last_checkpoints, the mean of the last checkpoints then replaces the best one."""
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.log_metrics("train", train_result.metrics)
    run_stats = stopwatch.stats(train_size)  # global figures: images of all processes; memory of this GPU
    if trainer.is_world_process_zero():
        Path(args.training.output_dir, "run_stats.json").write_text(json.dumps(run_stats, indent=2) + "\n")
        memory = "n/a (no GPU)" if run_stats["peak_gpu_memory_gib"] is None else f"{run_stats['peak_gpu_memory_gib']:.2f} GiB"
        print(f"throughput: {run_stats['images_per_second']} training images/s ({run_stats['train_images']} images in "
              f"{run_stats['train_seconds']} s, evaluation excluded); peak GPU memory {memory}")
    if args.fit.average_last_checkpoints:
        averaged = average_last_checkpoints(model, args.training.output_dir, args.fit.average_last_checkpoints)
        if trainer.is_world_process_zero():
            print(f"weights averaged over {len(averaged)} checkpoints: {', '.join(averaged)}")


def finish(trainer, model, spec: PixelSpec, splits, class_counts: Counter, args: Arguments, command: str) -> dict:
    """The operating point and the calibration, both fitted on validation and stored in the model, the out-of-domain
    files, the one look at the test split, the reports and the card, then the save (with --push_to_hub, the push);
    returns the metrics."""
    output_dir, main_process = Path(args.training.output_dir), trainer.is_world_process_zero()
    # From here on the model scores in fp32, as the app serves it: with --bf16 (or --fp16) Accelerate wrapped its
    # forward in autocast, and the threshold must be chosen on the probabilities that users get.
    trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    point = operating_point(trainer, splits["validation"], spec, args.threshold)
    model.config.decision_threshold, model.config.threshold_rule = point.threshold, args.threshold.describe()
    # The uncalibrated scores feed only the card's before/after calibration figures; nothing is chosen on test.
    uncalibrated = {"validation": point.whole, "test": predict_scores(trainer, splits["test"])}
    calibration = calibrate_head(model, point, splits["validation"], args.threshold)
    domain_check = add_domain_check(model, spec, splits["train"], splits["validation"], output_dir, DEFAULT_MODEL) if main_process else []
    results = {}
    for split in ("validation", "test"):  # as the saved model scores them, calibrated, at the stored threshold
        split_labels, split_scores = predict_scores(trainer, splits[split])
        if main_process:
            results[split] = write_report(split_labels, split_scores, model.config.decision_threshold, output_dir, split)
    if main_process:
        eces = calibration and reliability_diagram(uncalibrated, calibration, output_dir / "calibration.png")
        (output_dir / "README.md").write_text(model_card(
            results=results, config=model.config, spec=spec, class_counts=class_counts,
            split_sizes={name: len(split) for name, split in splits.items()}, source=args.model.model_name_or_path,
            data=args.data.dataset_name or args.data.data_dir, command=command, training_args=args.training,
            calibration_eces=eces, out_of_domain=domain_check,
        ))
        print(json.dumps({split: {k: v for k, v in m.items() if k != "confusion_matrix"} for split, m in results.items()}, indent=1))
    # With --push_to_hub, save_model also uploads the folder (Trainer.push_to_hub, from the main process only).
    trainer.save_model()
    return results


def calibrate_head(model, point, validation, policy: ThresholdPolicy) -> Calibration | None:
    """Calibrates P(PNEUMONIA) on the films the threshold was picked on, or says why it cannot."""
    try:
        return calibrate_operating_point(model, point, validation, policy.films())
    except ValueError as error:  # scores that do not rank validation's classes, or separate them perfectly
        print(f"warning: P(PNEUMONIA) left uncalibrated: {error}")
        return None


if __name__ == "__main__":
    main()
