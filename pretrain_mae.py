"""Self-supervised pretraining of a ViT encoder on unlabeled chest X-rays (masked autoencoder, He et al. 2022),
for `train_vit.py --model_name_or_path <output_dir>` to fine-tune.

    # the prepared training split (never validation or test) and the adult X-rays, the bundled ViT's size
    python pretrain_mae.py configs/mae_tiny_cpu.yaml

    # a large archive of your own on several GPUs, then fine-tuning from it
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml --num_processes 4 pretrain_mae.py \\
        configs/mae_tiny_cpu.yaml --image_dirs /data/my_xrays --use_cpu false --output_dir runs/mae_mine
    python train_vit.py configs/vit_tiny_cpu.yaml --model_name_or_path runs/mae_mine

A YAML or JSON file given first sets defaults; any --flag after it overrides them (every
`TrainingArguments` flag works: `--resume_from_checkpoint last`, `--push_to_hub --hub_model_id you/mae`, ...).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import (
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
    ViTMAEConfig,
    ViTMAEForPreTraining,
    set_seed,
)

from pneumonia_vit.images import LABELS
from pneumonia_vit.preprocess import PixelSpec
from pneumonia_vit.training.card import encoder_card
from pneumonia_vit.training.data import Augmentation, BatchTransform, collate, unlabeled_images, with_sample_index
from pneumonia_vit.training.trainer import (
    AugmentationEpoch,
    RunArguments,
    Stopwatch,
    StrictReloadTrainer,
    parse_with_config_file,
    resume_checkpoint,
)

logger = logging.getLogger("pretrain_mae")

# What the encoder and the classifier share: everything a ViTConfig reads from a ViTMAEConfig.
SHARED_CONFIG = ("image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "intermediate_size", "hidden_act", "layer_norm_eps", "qkv_bias", "initializer_range")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": (
        "A ViTMAEForPreTraining checkpoint to continue from (Hub id or folder); unset: from scratch.")})
    config_name: str | None = field(default=None, metadata={"help": "A ViTMAE config (Hub id or folder) to start from."})
    config_overrides: str | None = field(default=None, metadata={"help": (
        "Comma-separated settings over the config, e.g. image_size=128,hidden_size=192,num_hidden_layers=6,"
        "num_attention_heads=3,intermediate_size=768,mask_ratio=0.9,decoder_hidden_size=256,norm_pix_loss=false")})


@dataclass
class DataArguments:
    image_dirs: list[str] = field(default_factory=list, metadata={"help": (
        "Folders of unlabeled X-rays, searched recursively (any file the app reads: JPEG, PNG, 16-bit, DICOM).")})


class MaskedBatches:
    """The training transform plus MAE's masking noise, drawn per image from (seed, epoch, image index) like its
    augmentation, instead of from torch's global generator inside the model: a resumed run, and a run with any
    number of dataloader workers, masks exactly the patches an unbroken one does."""

    def __init__(self, transform: BatchTransform, patches: int):
        self.transform, self.patches = transform, patches

    def __call__(self, batch: dict) -> dict:
        out = self.transform(batch)
        seed, epoch = self.transform.seed, self.transform.epoch
        noise = [np.random.default_rng((seed, epoch, index, 1)).random(self.patches, dtype=np.float32)
                 for index in batch["sample_index"]]
        out["noise"] = torch.from_numpy(np.stack(noise))
        return out


def parse_arguments(argv: list[str]) -> tuple:
    return parse_with_config_file((ModelArguments, DataArguments, Augmentation, RunArguments, TrainingArguments), argv, "pretrain_mae.py")


def build_model(model_args: ModelArguments) -> ViTMAEForPreTraining:
    source = model_args.config_name or model_args.model_name_or_path
    config = ViTMAEConfig.from_pretrained(source) if source else ViTMAEConfig()
    if model_args.config_overrides:
        config.update_from_string(model_args.config_overrides)
    if model_args.model_name_or_path:
        return ViTMAEForPreTraining.from_pretrained(model_args.model_name_or_path, config=config)
    return ViTMAEForPreTraining(config)


def encoder_as_classifier(mae: ViTMAEForPreTraining) -> ViTForImageClassification:
    """The MAE's encoder in a ViT image classifier with a new NORMAL/PNEUMONIA head; fails unless every
    encoder tensor found its place."""
    config = ViTConfig(
        **{name: getattr(mae.config, name) for name in SHARED_CONFIG},
        num_labels=len(LABELS), id2label=dict(enumerate(LABELS)), label2id={label: i for i, label in enumerate(LABELS)},
    )
    classifier = ViTForImageClassification(config)
    encoder = {name: tensor for name, tensor in mae.state_dict().items() if name.startswith("vit.")}
    missing, unexpected = classifier.load_state_dict(encoder, strict=False)
    if unexpected or set(missing) != {"classifier.weight", "classifier.bias"}:
        raise RuntimeError(f"encoder weights did not map onto ViT: missing {missing}, unexpected {unexpected}")
    return classifier


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    model_args, data_args, augmentation, run_args, training_args = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    training_args.remove_unused_columns = False  # the transform reads the image paths and indices
    checkpoint = resume_checkpoint(training_args, run_args.overwrite_output_dir)
    set_seed(training_args.seed)

    if not data_args.image_dirs:
        raise ValueError("give --image_dirs: one or more folders of X-rays")
    from datasets import Dataset

    with training_args.main_process_first():
        files, skipped = unlabeled_images(data_args.image_dirs)
    if skipped and training_args.process_index == 0:
        logger.info("skipping %d file(s) that are not readable images: %s", len(skipped), "; ".join(skipped))
    if training_args.process_index == 0:
        logger.info("pretraining on %d images from %s", len(files), ", ".join(data_args.image_dirs))

    model = build_model(model_args)
    spec = PixelSpec(size=model.config.image_size)
    transform = MaskedBatches(BatchTransform(spec, augmentation, seed=training_args.seed),
                              patches=(model.config.image_size // model.config.patch_size) ** 2)
    dataset = with_sample_index(Dataset.from_dict({"image": files}))
    dataset.set_transform(transform)

    stopwatch = Stopwatch(run_args.max_train_minutes)
    trainer = StrictReloadTrainer(
        model=model, args=training_args, train_dataset=dataset, data_collator=collate,
        processing_class=spec.processor(), callbacks=[stopwatch, AugmentationEpoch(transform.transform)],
    )
    result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.log_metrics("train", result.metrics)

    # The encoder, ready for train_vit.py, with its card; pushed without the decoder or checkpoints.
    output = Path(training_args.output_dir)
    if trainer.is_world_process_zero():
        classifier = encoder_as_classifier(trainer.accelerator.unwrap_model(trainer.model))
        classifier.save_pretrained(output)
        spec.processor().save_pretrained(output)
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        (output / "run_stats.json").write_text(json.dumps({**stopwatch.stats(len(files)), "final_train_loss": losses[-1] if losses else None,
                                                           "images": len(files), "skipped_files": len(skipped)}, indent=2) + "\n")
        (output / "README.md").write_text(encoder_card(
            config=model.config, images=len(files), folders=data_args.image_dirs, losses=losses,
            command="python pretrain_mae.py " + " ".join(argv), training_args=training_args,
        ))
        if training_args.push_to_hub:
            from huggingface_hub import HfApi

            HfApi(token=training_args.hub_token).upload_folder(
                repo_id=trainer.hub_model_id, folder_path=output, commit_message="MAE-pretrained encoder",
                ignore_patterns=["checkpoint-*", "runs/*", "training_args.bin"],
            )
    return output


if __name__ == "__main__":
    main()
