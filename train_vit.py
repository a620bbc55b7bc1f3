"""Fine-tune (or train from scratch) a ViT that tells NORMAL from PNEUMONIA chest X-rays.

    # ViT-base from ImageNet-21k weights on one GPU (downloads the weights from the Hub)
    python train_vit.py configs/vit_base_gpu.yaml --data_dir data/chest_xray_prepared

    # the same on several GPUs
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml train_vit.py configs/vit_base_gpu.yaml

    # the bundled default model: a small ViT from scratch on 2 CPU cores, no download
    python train_vit.py configs/vit_tiny_cpu.yaml

A YAML or JSON file given first sets defaults; any --flag after it overrides them. Every
`TrainingArguments` flag works (`--push_to_hub --hub_model_id you/pneumonia-vit`,
`--resume_from_checkpoint last`, `--per_device_train_batch_size`, ...).

Stages: load the prepared splits -> build the model -> train with early stopping on validation
ROC-AUC -> choose the decision threshold on validation and store it in the model config ->
evaluate the test split once -> write metrics, plots and the model card -> push to the Hub.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    EarlyStoppingCallback,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from pneumonia_vit.card import model_card
from pneumonia_vit.data import Augmentation, BatchTransform, collate, load_splits
from pneumonia_vit.evaluation import predict_scores, write_report
from pneumonia_vit.images import LABELS
from pneumonia_vit.metrics import THRESHOLD_RULES, binary_metrics, choose_threshold
from pneumonia_vit.preprocess import PixelSpec


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="google/vit-base-patch16-224-in21k",
        metadata={"help": "Pretrained ViT to fine-tune: a Hub id or a local folder. Ignored with --from_config."},
    )
    from_config: bool = field(
        default=False,
        metadata={"help": "Build a randomly initialised ViT from the size flags below instead of downloading one."},
    )
    image_size: int = field(default=224, metadata={"help": "--from_config: input side in pixels."})
    patch_size: int = field(default=16, metadata={"help": "--from_config: patch side in pixels."})
    hidden_size: int = field(default=768, metadata={"help": "--from_config: embedding width."})
    num_hidden_layers: int = field(default=12, metadata={"help": "--from_config: transformer blocks."})
    num_attention_heads: int = field(default=12, metadata={"help": "--from_config: attention heads per block."})
    intermediate_size: int = field(default=3072, metadata={"help": "--from_config: MLP width."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on hidden states and attention (both model kinds)."})


@dataclass
class DataArguments:
    data_dir: str | None = field(
        default=None, metadata={"help": "Folder written by data_prep/prepare.py (train/, validation/, test/)."}
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset with train/validation/test splits and NORMAL/PNEUMONIA labels, instead of --data_dir."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only this many training images (quick runs)."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use only this many validation and test images each (quick runs)."}
    )
    augment: bool = field(default=True, metadata={"help": "Random rotation, shift, zoom and exposure on training images."})
    rotation_degrees: float = field(default=7.0, metadata={"help": "Largest random rotation, degrees."})
    zoom: float = field(default=0.1, metadata={"help": "Largest random zoom in or out, as a fraction."})
    shift: float = field(default=0.05, metadata={"help": "Largest random shift, as a fraction of the side."})
    exposure: float = field(default=0.15, metadata={"help": "Largest random brightness and contrast change, as a fraction."})


@dataclass
class RunArguments:
    class_weighted_loss: bool = field(
        default=True, metadata={"help": "Weight the loss by inverse class frequency (train has 2.9x more PNEUMONIA)."}
    )
    threshold_rule: str = field(
        default="youden",
        metadata={"help": f"How the validation split picks the P(PNEUMONIA) cut-off: one of {THRESHOLD_RULES}."},
    )
    min_sensitivity: float = field(default=0.95, metadata={"help": "For --threshold_rule min_sensitivity."})
    early_stopping_patience: int = field(
        default=5, metadata={"help": "Stop after this many evaluations without a better validation score (0: never)."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Train from scratch even if --output_dir holds checkpoints."}
    )


def parse_arguments(argv: list[str]):
    """A YAML/JSON file as the first argument sets defaults; flags after it override them."""
    parser = HfArgumentParser((ModelArguments, DataArguments, RunArguments, TrainingArguments))
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        config = yaml.safe_load(Path(argv[0]).read_text())  # JSON is YAML too
        parser.set_defaults(**config)
        argv = argv[1:]
    return parser.parse_args_into_dataclasses(args=argv)


def build_model(model_args: ModelArguments):
    """The ViT and the pixel spec it expects."""
    labels = {"id2label": dict(enumerate(LABELS)), "label2id": {label: i for i, label in enumerate(LABELS)}}
    dropout = {"hidden_dropout_prob": model_args.dropout, "attention_probs_dropout_prob": model_args.dropout}
    if model_args.from_config:
        config = ViTConfig(
            image_size=model_args.image_size, patch_size=model_args.patch_size, hidden_size=model_args.hidden_size,
            num_hidden_layers=model_args.num_hidden_layers, num_attention_heads=model_args.num_attention_heads,
            intermediate_size=model_args.intermediate_size, num_labels=len(LABELS), **labels, **dropout,
        )
        return ViTForImageClassification(config), PixelSpec(size=model_args.image_size)
    model = AutoModelForImageClassification.from_pretrained(
        model_args.model_name_or_path, num_labels=len(LABELS), ignore_mismatched_sizes=True, **labels, **dropout
    )
    processor = AutoImageProcessor.from_pretrained(model_args.model_name_or_path, backend="pil")
    return model, PixelSpec.from_processor(processor)


def weighted_loss(class_counts: Counter, label_smoothing: float):
    """Cross-entropy with each class weighted by total / (classes x its count)."""
    total = sum(class_counts.values())
    weight = torch.tensor([total / (len(LABELS) * class_counts[i]) for i in range(len(LABELS))])

    def loss(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits
        per_image = F.cross_entropy(
            logits.float(), labels, weight=weight.to(logits.device), label_smoothing=label_smoothing, reduction="none"
        )
        # Trainer passes the image count of the whole accumulated batch so that accumulation is exact.
        return per_image.mean() if num_items_in_batch is None else per_image.sum() / num_items_in_batch

    return loss


def compute_metrics(prediction) -> dict:
    """Validation metrics during training, at the neutral cut-off 0.5 (the real one is chosen after)."""
    scores = torch.from_numpy(prediction.predictions).float().softmax(dim=-1)[:, 1].numpy()
    metrics = binary_metrics(prediction.label_ids, scores, threshold=0.5)
    return {key: value for key, value in metrics.items() if isinstance(value, float) and key != "threshold"}


class CardTrainer(Trainer):
    """Trainer whose push uploads this project's model card instead of the generic one."""

    card_text: str | None = None

    def create_model_card(self, *args, **kwargs):
        if self.card_text is not None and self.is_world_process_zero():
            Path(self.args.output_dir, "README.md").write_text(self.card_text)


def resume_checkpoint(training_args: TrainingArguments, run_args: RunArguments) -> str | None:
    """Explicit resume: `--resume_from_checkpoint last|PATH`; leftover checkpoints without it are an error."""
    output_dir = Path(training_args.output_dir)
    requested = training_args.resume_from_checkpoint
    if requested == "last":
        last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        if last is None:
            raise FileNotFoundError(f"--resume_from_checkpoint last: no checkpoint-* folder in {output_dir}")
        return last
    if requested:
        return requested
    if output_dir.is_dir() and get_last_checkpoint(str(output_dir)) and not run_args.overwrite_output_dir:
        raise FileExistsError(
            f"{output_dir} holds checkpoints: pass --resume_from_checkpoint last to continue, "
            "or --overwrite_output_dir to start again"
        )
    return None


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, run_args, training_args = parse_arguments(sys.argv[1:] if argv is None else argv)
    training_args.remove_unused_columns = False  # the transforms read the "image" column
    checkpoint = resume_checkpoint(training_args, run_args)
    set_seed(training_args.seed)

    # Data: prepared imagefolder (or Hub dataset), optionally cut down for quick runs.
    with training_args.main_process_first():
        splits = load_splits(data_args.data_dir, data_args.dataset_name)
    limits = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples, "test": data_args.max_eval_samples}
    for name, limit in limits.items():
        if limit is not None and limit < len(splits[name]):
            splits[name] = splits[name].shuffle(seed=training_args.seed).select(range(limit))

    # Model and the transforms that feed it.
    model, spec = build_model(model_args)
    augmentation = Augmentation(
        rotation_degrees=data_args.rotation_degrees, zoom=data_args.zoom, shift=data_args.shift,
        brightness=data_args.exposure, contrast=data_args.exposure,
    ) if data_args.augment else None
    class_counts = Counter(splits["train"]["label"])  # read before set_transform, which would decode every image
    splits["train"].set_transform(BatchTransform(spec, augmentation))
    for name in ("validation", "test"):
        splits[name].set_transform(BatchTransform(spec))

    callbacks = []
    if run_args.early_stopping_patience and training_args.load_best_model_at_end:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=run_args.early_stopping_patience))
    trainer = CardTrainer(
        model=model,
        args=training_args,
        data_collator=collate,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        processing_class=spec.processor(),
        compute_loss_func=weighted_loss(
            class_counts if run_args.class_weighted_loss else Counter({0: 1, 1: 1}), training_args.label_smoothing_factor
        ),
        compute_metrics=compute_metrics,
        callbacks=callbacks,
    )
    if trainer.is_world_process_zero():
        effective = training_args.per_device_train_batch_size * training_args.world_size * training_args.gradient_accumulation_steps
        print(
            f"effective batch size {effective} = {training_args.per_device_train_batch_size} per device x "
            f"{training_args.world_size} processes x {training_args.gradient_accumulation_steps} accumulation steps; "
            f"train {dict(sorted(class_counts.items()))}, validation {len(splits['validation'])}, test {len(splits['test'])}"
        )

    # Train (or resume), keeping the checkpoint with the best validation score.
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.log_metrics("train", train_result.metrics)

    # Threshold on validation, stored in the config so the app and every evaluation use it.
    validation_labels, validation_scores = predict_scores(trainer, splits["validation"])
    threshold = choose_threshold(validation_labels, validation_scores, run_args.threshold_rule, run_args.min_sensitivity)
    model.config.decision_threshold = threshold
    model.config.threshold_rule = (
        f"min_sensitivity>={run_args.min_sensitivity}" if run_args.threshold_rule == "min_sensitivity" else "youden"
    )

    # The one look at the test split, with the threshold fixed beforehand.
    test_labels, test_scores = predict_scores(trainer, splits["test"])
    results = {}
    if trainer.is_world_process_zero():
        results["validation"] = write_report(validation_labels, validation_scores, threshold, training_args.output_dir, "validation")
        results["test"] = write_report(test_labels, test_scores, threshold, training_args.output_dir, "test")
        trainer.card_text = model_card(
            results=results, config=model.config, spec=spec, class_counts=class_counts,
            split_sizes={name: len(split) for name, split in splits.items()},
            source=model_args.model_name_or_path if not model_args.from_config else None,
            data=data_args.dataset_name or data_args.data_dir,
            command="python train_vit.py " + " ".join(sys.argv[1:] if argv is None else argv),
            training_args=training_args,
        )
        print(json.dumps({split: {k: v for k, v in m.items() if k != "confusion_matrix"} for split, m in results.items()}, indent=1))
    trainer.save_model()
    trainer.create_model_card()

    if training_args.push_to_hub:
        trainer.push_to_hub(commit_message="Trained with train_vit.py")
    return results


if __name__ == "__main__":
    main()
