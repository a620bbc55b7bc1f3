"""Evaluate a trained model folder or Hub id on one split of a prepared dataset.

    python evaluate_vit.py --model models/pneumonia-vit-tiny --data_dir data/chest_xray_prepared --split test
    python evaluate_vit.py --model you/pneumonia-vit --data_dir data/chest_xray_prepared --output_dir eval/vit-base
    python evaluate_vit.py --data_dir data/chest_xray_prepared --split validation --centre_crop 0.85

Writes {split}_metrics.json, {split}_confusion_matrix.png and {split}_roc.png at the model's stored
threshold (or --threshold), through the same code train_vit.py uses after training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from transformers import AutoModelForImageClassification, HfArgumentParser

from pneumonia_vit.inference.classifier import ModelInfo, load_pixel_spec
from pneumonia_vit.training.data import SPLITS, BatchTransform, load_splits
from pneumonia_vit.training.evaluation import predict_scores, scoring_trainer, write_report


@dataclass
class EvaluateArguments:
    model: str = field(default="models/pneumonia-vit-tiny", metadata={"help": "Model folder or Hub id."})
    data_dir: str | None = field(default=None, metadata={"help": "Folder written by data_prep/prepare.py."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset instead of --data_dir."})
    split: str = field(default="test", metadata={"help": f"One of {SPLITS}."})
    output_dir: str = field(default="outputs/evaluation", metadata={"help": "Where the metrics and plots go."})
    threshold: float | None = field(default=None, metadata={"help": "Override the model's stored decision threshold."})
    centre_crop: float = field(default=1.0, metadata={"help": (
        "Score the central part of each film (this fraction of its width and height), not the whole: how the model "
        "reads films framed tighter than the training ones (docs/experiments.md, framing). 1: the whole film.")})
    batch_size: int = field(default=64, metadata={"help": "Images per forward pass (per device)."})


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(EvaluateArguments).parse_args_into_dataclasses(args=argv)
    dataset = load_splits(args.data_dir, args.dataset_name)[args.split]
    model = AutoModelForImageClassification.from_pretrained(args.model)
    dataset.set_transform(BatchTransform(load_pixel_spec(args.model), crop=args.centre_crop))
    with scoring_trainer(model, args.batch_size) as trainer:
        labels, scores = predict_scores(trainer, dataset)
    threshold = ModelInfo.from_config(model.config.to_dict()).threshold if args.threshold is None else args.threshold
    metrics = {}
    if trainer.is_world_process_zero():
        metrics = write_report(labels, scores, threshold, args.output_dir, args.split)
        print(json.dumps(metrics, indent=1))
    return metrics


if __name__ == "__main__":
    main()
