"""Training machinery that train_vit.py and pretrain_mae.py share around transformers' Trainer."""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..cpus import cpu_seconds
from ..images import LABELS
from ..ood.fit import FITTED_PER_CLASSIFIER
from .evaluation import binary_metrics, labels_and_scores

logger = logging.getLogger(__name__)


@dataclass
class RunArguments:
    """The settings beside TrainingArguments that train_vit.py and pretrain_mae.py share."""

    overwrite_output_dir: bool = field(default=False, metadata={"help": (
        "Start again even if --output_dir holds checkpoints: an earlier run's checkpoints, weights, card and reports "
        "there are removed first (clear_previous_run).")})
    max_train_minutes: float | None = field(default=None, metadata={"help": (
        "Stop training after this many minutes of wall time (a time budget); train_vit.py keeps the best checkpoint so far.")})


def parse_with_config_file(dataclass_types, argv: list[str], script: str):
    """A YAML/JSON file as the first argument sets defaults; flags after it override them."""
    parser = HfArgumentParser(dataclass_types)
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        config = yaml.safe_load(Path(argv[0]).read_text()) or {}  # JSON is YAML too
        # set_defaults accepts any name: a misspelt key would otherwise surface as "too many values to unpack".
        unknown = sorted(set(config) - {action.dest for action in parser._actions})
        if unknown:
            raise ValueError(f"{argv[0]}: unknown setting(s) {', '.join(unknown)}; see python {script} --help")
        parser.set_defaults(**config)
        argv = argv[1:]
    return parser.parse_args_into_dataclasses(args=argv)


def weighted_loss(class_counts: Counter, label_smoothing: float):
    """Cross-entropy with each class weighted by total / (classes x its count)."""
    total = sum(class_counts.values())
    weight = torch.tensor([total / (len(LABELS) * class_counts[i]) for i in range(len(LABELS))])

    def loss(outputs, labels, num_items_in_batch=None):
        # A DeiT with a distillation token learns the labels through its [CLS] head (DistillationTrainer).
        logits = outputs.logits if getattr(outputs, "cls_logits", None) is None else outputs.cls_logits
        per_image = F.cross_entropy(logits.float(), labels, weight=weight.to(logits.device),
                                    label_smoothing=label_smoothing, reduction="none")
        # Trainer passes the image count of the whole accumulated batch so that accumulation is exact.
        return per_image.mean() if num_items_in_batch is None else per_image.sum() / num_items_in_batch

    return loss


def compute_metrics(prediction) -> dict:
    """Validation metrics during training, at the neutral cut-off 0.5 (the real one is chosen after)."""
    metrics = binary_metrics(*labels_and_scores(prediction), threshold=0.5)
    return {key: value for key, value in metrics.items() if isinstance(value, float) and key != "threshold"}


class StrictReloadTrainer(Trainer):
    """Trainer that reloads checkpoints strictly, and leaves the project's model card (card.py) in place.

    transformers 5 saves a ViT under its original key names and maps them back to its own only in
    `from_pretrained`; Trainer's resume and `load_best_model_at_end` call `load_state_dict(strict=False)` on the
    raw file instead, which silently leaves every encoder block as it was (huggingface/transformers#43701, #48805).
    Both go through `from_pretrained` here. When tests/test_train.py's check that stock Trainer still drops the
    weights fails, upstream has fixed the bug and the two reload overrides can go.
    """

    def create_model_card(self, *args, **kwargs):
        pass

    def _plain_model(self) -> bool:
        return not (self.is_deepspeed_enabled or self.is_fsdp_enabled)

    def _load_weights(self, folder: str, model=None) -> None:
        target = self.accelerator.unwrap_model(self.model if model is None else model)
        saved = type(target).from_pretrained(folder)
        target.load_state_dict(saved.state_dict(), strict=True)  # copies into target's own device and dtype

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not self._plain_model():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_weights(resume_from_checkpoint, model)

    def _load_best_model(self):
        folder = self.state.best_model_checkpoint
        saved = Path(folder, "model.safetensors").is_file() or Path(folder, "model.safetensors.index.json").is_file()
        if not self._plain_model() or not saved:
            return super()._load_best_model()  # sharded/DeepSpeed/FSDP, or a node that lacks the folder: Trainer's own path
        if self.is_world_process_zero():
            logger.info("loading the best model from %s (validation %s %s)", folder, self.args.metric_for_best_model, self.state.best_metric)
        self._load_weights(folder)


class DistillationTrainer(StrictReloadTrainer):
    """Adds knowledge distillation from a frozen teacher to the label loss, on every augmented training image.

    - Soft labels (Hinton et al. 2015): the KL divergence between the teacher's and the model's
      temperature-softened probabilities, weighted by `weight` against the label loss.
    - Token similarity (`token_weight`, `token_similarity_loss`): for two classes the probabilities carry one
      number per image, so the model may also match where the teacher sees similar things.
    - A model with a distillation token (DeiT, Touvron et al. 2021) takes both terms through that token's
      head and the labels through its [CLS] head; otherwise all go through the one head.

    A teacher from train_vit.py has a calibration folded into its head (logit difference a·z + c); the logits
    it learned, z = (z' - c) / a, are what is distilled."""

    def __init__(self, *args, teacher: torch.nn.Module, weight: float, temperature: float, token_weight: float = 0.0,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False).to(self.args.device)
        self.weight, self.temperature, self.token_weight = weight, temperature, token_weight
        calibration = getattr(teacher.config, "calibration", None)
        self.teacher_calibration = (calibration["slope"], calibration["intercept"]) if calibration else None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        distilling_tokens = model.training and self.token_weight > 0
        if distilling_tokens:
            inputs = {**inputs, "output_hidden_states": True}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            with torch.no_grad():
                teacher_outputs = self.teacher(pixel_values=inputs["pixel_values"], output_hidden_states=distilling_tokens)
            distillation_head = getattr(outputs, "distillation_logits", None)
            logits = outputs.logits if distillation_head is None else distillation_head
            teacher_logits = teacher_outputs.logits.float()
            if self.teacher_calibration:
                slope, intercept = self.teacher_calibration
                teacher_logits = F.pad((teacher_logits[:, 1:] - teacher_logits[:, :1] - intercept) / slope, (1, 0))  # [0, z]
            t = self.temperature
            per_image = self.weight * t * t * F.kl_div(
                F.log_softmax(logits.float() / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1),
                log_target=True, reduction="none").sum(dim=-1)
            if distilling_tokens:
                per_image = per_image + self.token_weight * token_similarity_loss(
                    outputs.hidden_states[-2], teacher_outputs.hidden_states, special_tokens=1 if distillation_head is None else 2)
            # Normalised as Trainer normalises the label loss: over the whole accumulated batch of all processes.
            if num_items_in_batch is None:
                distillation = per_image.mean()
            else:
                scale = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
                distillation = per_image.sum() / num_items_in_batch * scale
            loss = (1 - self.weight) * loss + distillation
        return (loss, outputs) if return_outputs else loss


def token_similarity_loss(tokens: torch.Tensor, teacher_maps: tuple[torch.Tensor, ...], special_tokens: int = 1) -> torch.Tensor:
    """Per image: mean squared difference between the pairwise cosine similarities of a ViT's patch tokens
    (batch, special_tokens + side², dim; [CLS] first, then DeiT's distillation token where it has one) and of
    the teacher's feature-map cells at the same positions (Tung & Mori 2019); it adds no parameters to the model.

    The teacher's map is its deepest one still at least `side` cells wide, average-pooled to side x side.
    Features are centred over positions first, so that the similarities compare positions with each other,
    not with a shared offset (a CNN's ReLU features are all positive).
    """
    side = math.isqrt(tokens.shape[1] - special_tokens)
    fine_enough = [m for m in teacher_maps if m.dim() == 4 and min(m.shape[-2:]) >= side]
    if side * side != tokens.shape[1] - special_tokens or not fine_enough:
        raise ValueError(f"token distillation needs a square token grid and a teacher feature map at least as fine; "
                         f"got {tokens.shape[1]} tokens and maps {[tuple(m.shape) for m in teacher_maps]}")
    cells = F.adaptive_avg_pool2d(fine_enough[-1].float(), side).flatten(2).transpose(1, 2)

    def similarities(features):
        features = F.normalize(features - features.mean(dim=1, keepdim=True), dim=-1)
        return features @ features.transpose(1, 2)

    return (similarities(tokens[:, special_tokens:].float()) - similarities(cells)).pow(2).mean(dim=(1, 2))


class AugmentationEpoch(TrainerCallback):
    """Tells the training transform which epoch starts, so that it seeds each image's augmentation with it.

    Trainer calls this before the epoch's data loader workers copy the transform; persistent workers would keep
    the first epoch's copy, so they are refused."""

    def __init__(self, transform):
        self.transform = transform

    def on_train_begin(self, args, state, control, **kwargs):
        if args.dataloader_persistent_workers:
            raise ValueError("--dataloader_persistent_workers is not supported: the workers would keep augmenting "
                             "as in the first epoch (see training.AugmentationEpoch)")

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.transform.epoch = math.floor(state.epoch + 1e-9)


class Stopwatch(TrainerCallback):
    """Training images per second with evaluation time left out, peak GPU memory, and an optional time budget."""

    def __init__(self, max_minutes: float | None = None):
        self.max_seconds = None if max_minutes is None else 60 * max_minutes
        self.eval_seconds = 0.0
        self.out_of_time = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.start_epoch, self.start_cpu = time.perf_counter(), state.epoch or 0.0, cpu_seconds()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.eval_seconds += (metrics or {}).get("eval_runtime", 0.0)

    def on_step_end(self, args, state, control, **kwargs):
        if self.max_seconds is not None and time.perf_counter() - self.start > self.max_seconds and not self.out_of_time:
            self.out_of_time = control.should_training_stop = True
            if state.is_world_process_zero:
                logger.info("time budget of %g min used up at step %d: stopping", self.max_seconds / 60, state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.train_seconds = time.perf_counter() - self.start - self.eval_seconds
        self.cpu_seconds = cpu_seconds() - self.start_cpu  # evaluation included: what the run cost the machine
        self.epochs = (state.epoch or 0.0) - self.start_epoch

    def stats(self, train_size: int) -> dict:
        images = round(self.epochs * train_size)
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        return {
            "train_images": images, "train_seconds": round(self.train_seconds, 2),
            "images_per_second": round(images / self.train_seconds, 1) if self.train_seconds > 0 else None,
            "evaluation_seconds": round(self.eval_seconds, 2), "cpu_seconds": round(self.cpu_seconds, 1),
            "peak_gpu_memory_gib": None if peak is None else round(peak, 3),
            "stopped_by_time_budget": self.out_of_time,
        }


CHECKPOINT_FILES = ("trainer_state.json", "model.safetensors", "optimizer.pt", "scheduler.pt")
CHECKPOINT_FOLDER = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")  # Trainer's checkpoint-<global step>


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be resumed from (missing, truncated or corrupt files)."""


def checkpoint_problem(folder: Path, weights_and_optimizer: bool = True) -> str | None:
    """What makes `folder` unusable for a resume (such as a file cut short by a kill during the save, or emptied
    by a full disk), or None when its files are complete."""
    from safetensors import safe_open

    if not folder.is_dir():
        return "no such folder"
    required = CHECKPOINT_FILES if weights_and_optimizer else CHECKPOINT_FILES[:1]
    sharded = (folder / "model.safetensors.index.json").is_file()
    missing = [name for name in required if not (folder / name).is_file() and not (name == "model.safetensors" and sharded)]
    if missing:
        return f"{', '.join(missing)} missing"
    try:
        int(json.loads((folder / "trainer_state.json").read_text())["global_step"])
    except (ValueError, KeyError, TypeError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return f"trainer_state.json is truncated or corrupt ({type(error).__name__}: {error})"
    if not weights_and_optimizer:
        return None
    weight_files = ["model.safetensors"]
    if sharded:
        try:
            weight_files = sorted(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            return f"model.safetensors.index.json is truncated or corrupt ({type(error).__name__}: {error})"
    for name in weight_files:
        try:
            with safe_open(str(folder / name), framework="pt") as weights:
                if not list(weights.keys()):
                    return f"{name} holds no tensors"
        except Exception as error:  # safetensors raises SafetensorError; a missing shard, OSError
            return f"{name} is truncated or corrupt ({error})"
    for name in CHECKPOINT_FILES[2:]:
        try:
            with zipfile.ZipFile(folder / name) as archive:
                damaged = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            return f"{name} is truncated or corrupt ({error})"
        if damaged:
            return f"{name} is corrupt (bad CRC in {damaged})"
    return None


# What a training run writes at the top of its output folder (weights, configs, card, reports).
RUN_FILE_PATTERNS = (
    "README.md", "config.json", "preprocessor_config.json", "training_args.bin", "model*.safetensors",
    "model.safetensors.index.json", "run_stats.json", *FITTED_PER_CLASSIFIER, "*_metrics.json",
    "*_confusion_matrix.png", "*_roc.png", "calibration.png",
)


def clear_previous_run(output_dir: Path) -> list[str]:
    """Removes an earlier run's checkpoint-N folders and RUN_FILE_PATTERNS files from `output_dir` (nothing else);
    returns their names. Kept, they would mix two runs: a push would upload the old card beside the new weights."""
    removed = []
    for path in sorted(output_dir.iterdir()):
        if path.is_dir() and CHECKPOINT_FOLDER.match(path.name):
            shutil.rmtree(path)
        elif path.is_file() and any(path.match(glob) for glob in RUN_FILE_PATTERNS):
            path.unlink()
        else:
            continue
        removed.append(path.name)
    return removed


def resume_checkpoint(training_args: TrainingArguments, overwrite_output_dir: bool = False) -> str | None:
    """Explicit resume: `--resume_from_checkpoint last|PATH`; leftover checkpoints without it are an error.

    `last` takes the newest complete checkpoint-N folder, saying why it skips each newer one. Never silently
    starts from scratch; starting again with `overwrite_output_dir` first clears the earlier run."""
    output_dir = Path(training_args.output_dir)
    requested = training_args.resume_from_checkpoint
    # DeepSpeed and FSDP keep weights and optimizer in their own layout: only trainer_state.json is checked.
    full_check = not (training_args.deepspeed or training_args.fsdp)
    say = logger.info if training_args.process_index == 0 else lambda *args: None  # once, not once per process
    if requested == "last":
        found = checkpoints_by_step(output_dir)[::-1]
        if not found:
            raise FileNotFoundError(f"--resume_from_checkpoint last: no checkpoint-* folder in {output_dir}")
        broken = []
        for folder in found:
            problem = checkpoint_problem(folder, full_check)
            if problem is None:
                say("resuming from %s%s", folder, ", the newest complete checkpoint" if broken else "")
                return str(folder)
            broken.append(f"{folder} ({problem})")
            say("skipping checkpoint %s: %s; trying the one before it", folder, problem)
        raise CheckpointError(f"--resume_from_checkpoint last: no usable checkpoint in {output_dir}: "
                              f"{'; '.join(broken)}. To start again, pass --overwrite_output_dir instead of "
                              "--resume_from_checkpoint (it removes them).")
    if requested:
        problem = checkpoint_problem(Path(requested), full_check)
        if problem is not None:
            raise CheckpointError(f"--resume_from_checkpoint {requested}: cannot resume from {requested}: {problem}")
        say("resuming from %s", requested)
        return requested
    if output_dir.is_dir() and get_last_checkpoint(str(output_dir)) and not overwrite_output_dir:
        raise FileExistsError(f"{output_dir} holds checkpoints: pass --resume_from_checkpoint last to continue, "
                              "or --overwrite_output_dir to start again")
    if overwrite_output_dir and output_dir.is_dir() and training_args.process_index == 0:
        removed = clear_previous_run(output_dir)
        if removed:
            logger.info("--overwrite_output_dir: removed the previous run's %s from %s", ", ".join(removed), output_dir)
    return None


def checkpoints_by_step(output_dir: Path) -> list[Path]:
    """The checkpoint-N folders in `output_dir`, oldest first."""
    found = [path for path in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*") if path.is_dir() and CHECKPOINT_FOLDER.match(path.name)]
    return sorted(found, key=lambda path: int(CHECKPOINT_FOLDER.match(path.name).group(1)))


def check_averaging_possible(count: int, training_args: TrainingArguments) -> None:
    """Refuses, before any training, settings under which the last `count` checkpoints would not all be kept."""
    if count <= 0:
        return
    if training_args.save_strategy == "no":
        raise ValueError("--average_last_checkpoints needs saved checkpoints: set --save_strategy epoch (or steps)")
    # Trainer's rotation also keeps the best checkpoint, which takes one of the save_total_limit places.
    needed = count + int(bool(training_args.load_best_model_at_end))
    limit = training_args.save_total_limit
    if limit is not None and limit < needed:
        raise ValueError(f"--average_last_checkpoints {count} needs --save_total_limit of at least {needed} "
                         f"(it is {limit}): Trainer would delete the older checkpoints before they are averaged")


def average_last_checkpoints(model, output_dir: Path, count: int) -> list[str]:
    """Replaces `model`'s weights by the mean of the last `count` checkpoints' weights (SWA, Izmailov et al. 2018:
    nearer the centre of the minimum that a decaying schedule circles, where the loss is flatter); returns their
    folder names. Each is read through `from_pretrained` (see StrictReloadTrainer), never as the raw file."""
    folders = checkpoints_by_step(output_dir)[-count:]
    if len(folders) < count:
        raise CheckpointError(f"--average_last_checkpoints {count}: only {len(folders)} checkpoint(s) in {output_dir}")
    states = [type(model).from_pretrained(str(folder)).state_dict() for folder in folders]
    own = model.state_dict()
    model.load_state_dict({
        name: torch.stack([state[name].double() for state in states]).mean(dim=0).to(tensor.dtype)
        if tensor.is_floating_point() else states[-1][name]
        for name, tensor in own.items()
    }, strict=True)
    return [folder.name for folder in folders]
