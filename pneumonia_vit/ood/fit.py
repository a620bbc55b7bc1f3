"""Fits the out-of-domain rules that need data (ood/check.py runs them) and saves them in a model folder:
the kind model (rule 3), on ood/corpus.py's four kinds, independent of the classifier, so a retrained classifier
keeps it; and what belongs to one trained classifier, its feature statistics (rule 4; train_vit.py fits them at the
end of training) and the child score that rule 3 adds to the kind model's (it needs the kind model in the folder).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..images import load_xray
from ..preprocess import PixelSpec, pixel_values
from .check import CHECK_FILE, CHECK_SIDE, KINDS, STATS_FILE, DomainStats, KindModel, kind_score
from .corpus import (
    ADULT_FOLDS,
    PEDIATRIC,
    PEDIATRIC_COPIES,
    SYNTHETIC_COUNT,
    adult_files,
    films,
    image_files,
    readable,
    thumbnails,
    training_set,
)

log = logging.getLogger(__name__)

FITTED_PER_CLASSIFIER = (STATS_FILE,)  # what add_domain_check fits to one classifier: a new run replaces them
KIND_QUANTILE = 0.01  # share of the pediatric validation split the kind model's cut-off flags
FEATURE_QUANTILE = 0.999  # rule 4's cut-off: this quantile of the validation split's distances
WIDTH = 8  # kind_network's first convolution's channels
EPOCHS = 12
BATCH = 128
SEED = 2024
# The child score's fit: augmented copies of each pediatric training film (the other kinds in proportion);
# with one copy, the adult-fold recall moved with the random draw of augmentations.
CHILD_SCORE_COPIES = 2
CHILD_SCORE_SEED = SEED + 1  # not the kind model's draws: the two opinions should not share their errors


def kind_network(width: int = WIDTH):
    """The kind model's layers for training: four 3x3 convolution blocks (width, 2, 4, 4 x width
    channels, each halving the side) keep where things are in the film (lungs, arms, labels, a turned
    film's layout), then one hidden layer and a logit per KINDS entry."""
    from torch import nn

    layers, channels = [], 1
    for out in (width, 2 * width, 4 * width, 4 * width):
        layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
        channels = out
    side = CHECK_SIDE // 16
    return nn.Sequential(*layers, nn.Flatten(), nn.Dropout(0.3), nn.Linear(channels * side * side, 128), nn.ReLU(),
                         nn.Linear(128, len(KINDS)))


def kind_tensors(network) -> dict[str, np.ndarray]:
    """A trained kind_network as KindModel runs it: each batch norm folded into its convolution."""
    from torch import nn

    modules, tensors = list(network), {}
    convolutions = [(m, modules[i + 1]) for i, m in enumerate(modules) if isinstance(m, nn.Conv2d)]
    for index, (convolution, norm) in enumerate(convolutions):
        scale = (norm.weight / (norm.running_var + norm.eps).sqrt()).detach()
        tensors[f"conv{index}.weight"] = (convolution.weight.detach() * scale[:, None, None, None]).numpy()
        tensors[f"conv{index}.bias"] = ((convolution.bias.detach() - norm.running_mean) * scale + norm.bias.detach()).numpy()
    hidden, output = (m for m in modules if isinstance(m, nn.Linear))
    for name, linear in (("hidden", hidden), ("output", output)):
        tensors[f"{name}.weight"], tensors[f"{name}.bias"] = linear.weight.detach().numpy(), linear.bias.detach().numpy()
    return {name: np.ascontiguousarray(array, dtype=np.float32) for name, array in tensors.items()}


def train_kind_network(inputs: np.ndarray, kinds: np.ndarray, width: int = WIDTH, epochs: int = EPOCHS,
                       seed: int = SEED):
    """kind_network trained on (N, 1, side, side) thumbnails and their KINDS indices: class-balanced
    cross-entropy, AdamW with a one-cycle schedule, mirrored and slightly shifted copies (a mirrored
    or reframed film is still the same kind). The same seed and thread count give the same weights."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    network = kind_network(width)
    images, targets = torch.from_numpy(inputs), torch.from_numpy(kinds).long()
    counts = np.bincount(kinds, minlength=len(KINDS))
    balance = torch.tensor(len(kinds) / (len(KINDS) * np.maximum(counts, 1)), dtype=torch.float32)
    loss_function = nn.CrossEntropyLoss(weight=balance, label_smoothing=0.05)
    optimizer = torch.optim.AdamW(network.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * -(-len(targets) // BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    network.train()
    for epoch in range(epochs):
        order, total = torch.randperm(len(targets), generator=generator), 0.0
        for start in range(0, len(targets), BATCH):
            index = order[start:start + BATCH]
            batch = images[index]
            mirrored = torch.rand(len(index), generator=generator) < 0.5
            batch = torch.where(mirrored[:, None, None, None], batch.flip(-1), batch)
            batch = torch.roll(batch, torch.randint(-3, 4, (2,), generator=generator).tolist(), dims=(2, 3))
            loss = loss_function(network(batch), targets[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(index)
        log.info("kind model: epoch %d of %d, loss %.4f", epoch + 1, epochs, total / len(targets))
    return network.eval()


def fit_kind_model(data_dir: str | Path, adult_dir: str | Path, output_dir: str | Path | None = None, seed: int = SEED,
                   copies: int = PEDIATRIC_COPIES, synthetic_count: int = SYNTHETIC_COUNT) -> KindModel:
    """Fits rule 3, its cut-off at the KIND_QUANTILE of the pediatric validation split's P(pediatric), and, with
    `output_dir`, saves it there. `copies` and `synthetic_count` size the training set (corpus.training_set)."""
    inputs, kinds = training_set(data_dir, adult_dir, np.random.default_rng(seed), copies, synthetic_count)
    counts = np.bincount(kinds, minlength=len(KINDS))
    model = KindModel(tensors=kind_tensors(train_kind_network(inputs, kinds, seed=seed)), threshold=0.0)
    validation = thumbnails(load_xray(path) for path in image_files(Path(data_dir, "validation")))
    model.threshold = float(np.quantile(model.probabilities(validation)[:, PEDIATRIC], KIND_QUANTILE))
    model.metadata = {
        "quantile": repr(KIND_QUANTILE), "seed": str(seed), "width": str(WIDTH), "epochs": str(EPOCHS),
        "training_inputs": ",".join(f"{kind}={count}" for kind, count in zip(KINDS, counts)),
        "validation_count": str(len(validation)), "adult_folds": ",".join(f"{n}={p}" for n, p in ADULT_FOLDS),
    }
    log.info("kind model: cut-off P(pediatric) < %.4f = %.1f%% quantile of %d validation images",
             model.threshold, 100 * KIND_QUANTILE, len(validation))
    if output_dir is not None:
        log.info("kind model saved to %s", model.save(output_dir))
    return model


# ---- what belongs to one classifier: rule 4's statistics, rule 3's child score ---------------------

def embed(model, spec: PixelSpec, images: Iterable, batch_size: int = 64) -> np.ndarray:
    """The head-input features, (N, hidden), in order, of a `datasets` split's "image" column (any transform set on
    it bypassed) or of an iterable of paths, bytes or PIL images."""
    from ..inference.backends import forward

    if hasattr(images, "with_format"):
        images = (image for batch in images.with_format(None).iter(batch_size=batch_size) for image in batch["image"])
    was_training = model.training
    model.eval()
    chunks, stream = [], map(load_xray, images)
    try:
        while batch := list(itertools.islice(stream, batch_size)):
            chunks.append(forward(model, pixel_values(batch, spec)).features)
    finally:
        model.train(was_training)
    if not chunks:
        raise ValueError("no images to embed")
    return np.concatenate(chunks).astype(np.float64)


def fit_domain_stats(model, spec: PixelSpec, train, validation, output_dir: str | Path | None = None) -> DomainStats:
    """Fits rule 4 on the training split, its cut-off on the validation split (either one a `datasets` split or an
    iterable of images, as `embed` reads them) and, with `output_dir`, saves it there. The covariance is
    Ledoit-Wolf shrunk, so it stays invertible with fewer images than dimensions."""
    from sklearn.covariance import LedoitWolf

    train_features, validation_features = embed(model, spec, train), embed(model, spec, validation)
    estimate = LedoitWolf().fit(train_features)
    stats = DomainStats(estimate.location_, estimate.precision_, threshold=float("inf"), quantile=FEATURE_QUANTILE,
                        train_count=len(train_features), validation_count=len(validation_features))
    stats.threshold = float(np.quantile(stats.distance(validation_features), FEATURE_QUANTILE))
    if output_dir is not None:
        path = stats.save(output_dir)
        log.info("domain stats: %d training embeddings, cut-off %.2f = %.1f%% quantile of %d validation distances -> %s",
                 stats.train_count, stats.threshold, 100 * FEATURE_QUANTILE, stats.validation_count, path)
    return stats


def add_domain_check(model, spec: PixelSpec, train, validation, output_dir: str | Path, kind_model_from: str | Path) -> list[str]:
    """Gives a newly trained classifier's folder rule 4's statistics and, unless it has one, the kind model of
    `kind_model_from` (the child score needs the adult images: the command line adds it). Returns what it did,
    in sentences."""
    output_dir, source = Path(output_dir), Path(kind_model_from) / CHECK_FILE
    stats = fit_domain_stats(model, spec, train, validation, output_dir)
    done = [f"Feature-distance check (rule 4): `{STATS_FILE}`, fitted on this run's training split, cut-off "
            f"{stats.threshold:.2f} at the {100 * stats.quantile:g}% quantile of its validation split."]
    if (output_dir / CHECK_FILE).is_file():
        done.append(f"Image-kind check (rule 3): the folder's own `{CHECK_FILE}`, kept.")
    elif source.is_file():
        shutil.copyfile(source, output_dir / CHECK_FILE)
        done.append(f"Image-kind check (rule 3): `{CHECK_FILE}` copied from `{kind_model_from}` (it does not depend on the classifier).")
    else:
        done.append(f"No image-kind check (rule 3): {source} is missing; fit one with --kind_model (see ood/fit.py).")
    log.info("%s: %s", output_dir, " ".join(done))
    return done


def fit_child_score(model, spec: PixelSpec, stats: DomainStats, kind_model: KindModel, data_dir: str | Path,
                    adult_dir: str | Path) -> DomainStats:
    """Fits rule 3's second opinion into `stats`: a logistic regression on the classifier's features of
    source-augmented films, pediatric training films against fit-fold adult and altered films, as the kind
    model sees them; its weight beside the kind model; the combined score's cut-off at the kind model's quantile."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    pediatric, adults, altered = films(data_dir, adult_dir, np.random.default_rng(CHILD_SCORE_SEED), CHILD_SCORE_COPIES,
                                       adult_share=0.6, altered_copies=CHILD_SCORE_COPIES)
    children = embed(model, spec, readable(pediatric))
    others = np.concatenate([embed(model, spec, readable(images)) for images in (adults, altered)])
    features = np.concatenate([children, others])
    is_child = np.r_[np.ones(len(children)), np.zeros(len(others))]
    scaler = StandardScaler().fit(features)
    regression = LogisticRegression(C=1.0, max_iter=3000, class_weight="balanced").fit(scaler.transform(features), is_child)
    stats.child_weight = regression.coef_[0] / scaler.scale_  # the standardisation folded into the weights
    stats.child_bias = float(regression.intercept_[0] - stats.child_weight @ scaler.mean_)

    # The weight of the child score beside the kind model's logit, from films neither was fitted on
    # (validation children, select-fold adults): the regression's scale follows the draw of augmentations.
    def scores(paths: list[Path]) -> np.ndarray:
        images = [load_xray(path) for path in paths]  # decoded once for both models
        p_pediatric = kind_model.probabilities(thumbnails(images))[:, PEDIATRIC]
        return np.c_[kind_score(p_pediatric, 0.0), stats.child_score(embed(model, spec, images))]

    validation, select = image_files(Path(data_dir, "validation")), adult_files(adult_dir, "select")
    if not select:
        raise ValueError(f"{adult_dir}: no adult images in the select fold, which sets the child score's weight")
    validation_scores, select_scores = scores(validation), scores(select)
    balance = LogisticRegression(class_weight="balanced").fit(
        np.r_[validation_scores, select_scores], np.r_[np.ones(len(validation)), np.zeros(len(select))])
    weight = max(float(balance.coef_[0][1]), 0.0) / max(float(balance.coef_[0][0]), 1e-6)
    stats.child_weight, stats.child_bias = weight * stats.child_weight, weight * stats.child_bias
    combined = validation_scores[:, 0] + weight * validation_scores[:, 1]
    quantile = float(kind_model.metadata.get("quantile", KIND_QUANTILE))
    stats.kind_cutoff = float(np.quantile(combined, quantile))
    stats.kind_model_fingerprint = kind_model.fingerprint
    log.info("child score: %d pediatric and %d adult or altered films, weight %.3f beside the kind model; combined "
             "cut-off %.3f = %.1f%% quantile of %d validation images", len(children), len(others), weight,
             stats.kind_cutoff, 100 * quantile, len(validation))
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pneumonia_vit.ood.fit", description=__doc__)
    parser.add_argument("model_dir", help="the model folder to save into")
    parser.add_argument("--data_dir", required=True, help="prepared data (train/ and validation/ folders)")
    parser.add_argument("--adult_dir", help="adult_cxr_224/ (images/ and provenance.csv): for --kind_model, and for "
                                            "--feature_stats the child score rule 3 adds to the kind model's")
    parser.add_argument("--kind_model", action="store_true", help="fit the kind model (rule 3; needs --adult_dir)")
    parser.add_argument("--feature_stats", action="store_true",
                        help="fit the Mahalanobis statistics of the classifier in model_dir (rule 4) and, with "
                             "--adult_dir, its child score (rule 3, with the kind model in model_dir)")
    parser.add_argument("--copies", type=int, default=PEDIATRIC_COPIES,
                        help="augmented copies of each pediatric training film in the kind model's fit")
    parser.add_argument("--synthetic_count", type=int, default=SYNTHETIC_COUNT,
                        help="drawn non-X-ray images in the kind model's fit")
    args = parser.parse_args(argv)
    if not args.kind_model and not args.feature_stats:
        parser.error("give --kind_model, --feature_stats, or both")
    if args.kind_model and not args.adult_dir:
        parser.error("--kind_model needs --adult_dir (the adult chest X-rays it learns to tell apart)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.kind_model:
        fit_kind_model(args.data_dir, args.adult_dir, args.model_dir, copies=args.copies,
                       synthetic_count=args.synthetic_count)
        previous = DomainStats.load(args.model_dir)
        if not args.feature_stats and previous is not None and previous.child_weight is not None:
            log.warning("the child score in %s was set with the previous kind model: rule 3 uses the new kind model "
                        "alone until you refit it (--feature_stats --adult_dir)", args.model_dir)
    if args.feature_stats:
        from ..inference.classifier import Classifier
        from ..training.data import load_splits

        classifier = Classifier.load(args.model_dir, fast=False)  # the features the app computes: fp32 PyTorch
        splits = load_splits(args.data_dir)
        stats = fit_domain_stats(classifier.model, classifier.spec, splits["train"], splits["validation"])
        if args.adult_dir:
            kind_model = KindModel.load(args.model_dir)
            if kind_model is None:
                parser.error(f"the child score is added to the kind model's, and {args.model_dir} has none: "
                             "fit it first (--kind_model) or copy domain_check.safetensors there")
            fit_child_score(classifier.model, classifier.spec, stats, kind_model, args.data_dir, args.adult_dir)
        else:
            log.info("no --adult_dir: rule 3 uses the kind model alone")
        log.info("domain stats saved to %s", stats.save(args.model_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
