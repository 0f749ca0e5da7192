"""Train a classifier from scratch and write its weights, model card, OOD statistics and figures.

    breastcad train --modality {US,MG,SM} [--arch NAME] [--data DIR] [--epochs N] [--out DIR]
    (or: OMP_WAIT_POLICY=PASSIVE python -m inference.train --modality SM --out runs/sm)

(``OMP_WAIT_POLICY=PASSIVE`` keeps torch's two OpenMP threads from spinning, which on a 2-core
machine shared with other processes made training 2-4 times slower.)

One recipe per modality (``RECIPES``): the data set and its patient/group split, input size and
channels, augmentation, batch size and time budget. Any architecture of ``inference.networks``
can be trained with any recipe. Writes into the out dir: ``<name>.pt`` (a ``state_dict``),
``<name>.json`` (the model card), ``<name>_ood.npz`` (out-of-distribution statistics),
``<name>_history.json``, ``<name>_curves.png``, ``<name>_confusion.png`` and ``<name>_roc.png``.
Copy ``.pt``, ``.json`` and ``_ood.npz`` into ``inference/bundled/`` to ship a model.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import hashlib
import json
import math
import platform
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import set_track_meta
from monai.transforms import Compose
from monai.utils import set_determinism
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm import tqdm

from inference.datasets import (
    BUSI_LABELS,
    IDC_LABELS,
    MIAS_LABELS,
    ImageDataset,
    Sample,
    load_image,
    pad_to,
    read_idc,
    read_labels,
    read_mias,
    split_by_group,
)
from inference.metrics import evaluation_metrics, fit_temperature, softmax
from inference.networks import build_network, resolve_architecture
from inference.ood import MahalanobisScorer
from inference.paths import shared_data_dir
from inference.schedule import budget_fraction, learning_rate
from inference.transforms import (
    BatchHistologyAugment,
    augment_transform,
    normalize_transform,
    preprocess_transform,
    standardize_batch,
)

OOD_PERCENTILE = 99.0


@dataclass(frozen=True)
class Recipe:
    """How to train the model of one modality."""

    modality: str
    name: str
    dataset: str
    labels: tuple[str, ...]
    reader: Callable[[Path], list[Sample]]
    channels: int
    size: int
    augment_kind: str
    architecture: str
    batch_size: int
    lr: float
    max_minutes: float
    epochs: int
    patience: int
    task: str
    data_description: str
    split_method: str
    breast_crop: bool = False
    fixed_normalization: bool = False
    hflip_tta_allowed: bool = True
    pad_to: int = 0
    patch_model: bool = False


RECIPES: dict[str, Recipe] = {
    "US": Recipe(
        modality="US", name="us_busi", dataset="busi", labels=BUSI_LABELS, reader=read_labels,
        channels=1, size=192, augment_kind="ultrasound", architecture="BusiCNN", batch_size=32,
        lr=2e-3, max_minutes=13.0, epochs=120, patience=30,
        task="breast ultrasound image classification (normal / benign / malignant)",
        data_description=(
            "BUSI (Dataset_BUSI_with_GT), 256x256 re-sized copy, shared part; "
            "shared/data/busi/SOURCE.md (Al-Dhabyani et al., Data in Brief 2020)"
        ),
        split_method=(
            "by dup_group (near-duplicate groups, dHash), stratified by the group's majority "
            "label, 70/15/15; inference.datasets.split_by_group"
        ),
    ),
    "SM": Recipe(
        modality="SM", name="sm_idc", dataset="idc-breast-histopathology", labels=IDC_LABELS,
        reader=read_idc, channels=3, size=50, augment_kind="histopathology",
        architecture="MonaiResNet", batch_size=128, lr=2e-3, max_minutes=13.0, epochs=60,
        patience=12,
        task="H&E patch classification, invasive ductal carcinoma (idc) or not (non_idc); "
        "50x50 px patches of 40x scans (about 2.5x-equivalent field of view per patch)",
        data_description=(
            "IDC_regular_ps50_idx5 subset, shared part; shared/data/idc-breast-histopathology/"
            "SOURCE.md (Cruz-Roa et al. 2014; Janowczyk & Madabhushi 2016)"
        ),
        split_method=(
            "by patient, stratified by the patient's majority label, 70/15/15; "
            "inference.datasets.split_by_group"
        ),
        fixed_normalization=True,
        hflip_tta_allowed=False,
        pad_to=50,
    ),
    "MG": Recipe(
        # A patch model (inference.mammo_patches, trained by inference.train_mammo): ``size`` is
        # the patch size in pixels of the 256-row working image.
        modality="MG", name="mg_mias", dataset="mini-mias", labels=MIAS_LABELS, reader=read_mias,
        channels=1, size=64, augment_kind="mammography patches", architecture="BusiCNN",
        batch_size=64, lr=2e-3, max_minutes=15.0, epochs=60, patience=15,
        task="mammogram (MLO) classification (normal / benign / malignant) by a patch CNN slid "
        "over the breast; the score that matters is normal vs abnormal",
        data_description=(
            "mini-MIAS, 1024x1024 8-bit digitised film, shared part; "
            "shared/data/mini-mias/SOURCE.md (Suckling et al. 1994)"
        ),
        split_method=(
            "by patient (left/right pair), stratified by the patient's majority label, "
            "70/15/15; inference.datasets.split_by_group"
        ),
        breast_crop=True,
        patch_model=True,
    ),
}


def recipe_for(modality: str) -> Recipe:
    """The recipe of a modality; ValueError naming the known ones otherwise."""
    recipe = RECIPES.get(str(modality).strip().upper())
    if recipe is None:
        raise ValueError(f"no training recipe for modality {modality!r} (have: "
                         f"{', '.join(sorted(RECIPES))})")
    return recipe


def sha256_of(path: Path) -> str:  # noqa: D103
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@torch.no_grad()
def predict_outputs(
    model: nn.Module, loader: DataLoader[Any], hflip: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits, embeddings and targets of a whole loader, model in eval mode; with ``hflip`` the
    mean over each image and its left-right mirror (what ``Classifier`` does for such a card)."""
    model.eval()
    logits: list[np.ndarray] = []
    embeddings: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    for images, labels in loader:
        views = torch.cat([images, torch.flip(images, dims=[3])]) if hflip else images
        features = model.forward_features(views)  # type: ignore[operator]
        embedding = model.embed(features)  # type: ignore[operator]
        output = model.classify(embedding)  # type: ignore[operator]
        if hflip:
            count = images.shape[0]
            output = (output[:count] + output[count:]) / 2.0
            embedding = (embedding[:count] + embedding[count:]) / 2.0
        logits.append(output.float().numpy())
        embeddings.append(embedding.float().numpy())
        targets.append(np.asarray(labels))
    return np.concatenate(logits), np.concatenate(embeddings), np.concatenate(targets)


def predict_logits(
    model: nn.Module, loader: DataLoader[Any], hflip: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and targets of a whole loader (see ``predict_outputs``)."""
    logits, _, targets = predict_outputs(model, loader, hflip)
    return logits, targets


def training_data_section(
    recipe: Recipe, samples: Sequence[Sample], **extra: str
) -> dict[str, Any]:
    """The card's ``training_data``: the data set, its images, groups and labels."""
    return {
        "dataset": recipe.data_description,
        "images": len(samples),
        "groups": len({s.group for s in samples}),
        "images_per_label": dict(sorted(Counter(s.label for s in samples).items())),
        **extra,
    }


def _split_summary(split: dict[str, list[Sample]]) -> dict[str, Any]:
    return {
        name: {
            "groups": len({s.group for s in samples}),
            "images": len(samples),
            "images_per_label": dict(sorted(Counter(s.label for s in samples).items())),
        }
        for name, samples in split.items()
    }


def selection_score(metrics: dict[str, Any], modality: str) -> float:
    """What picks the epoch and the test-time augmentation, on validation only.

    US: mean(macro AUC, accuracy); SM: mean(AUC, balanced accuracy); MG: mean(AUC normal vs
    abnormal, balanced accuracy) (the clinically relevant question on mini-MIAS).
    """
    if modality == "MG":
        return 0.5 * float(metrics.get("auc_abnormal") or 0.0) + 0.5 * float(
            metrics["balanced_accuracy"]
        )
    if modality == "SM":
        return 0.5 * float(metrics["auc"] or 0.0) + 0.5 * float(metrics["balanced_accuracy"])
    return 0.5 * float(metrics["auc"] or 0.0) + 0.5 * float(metrics["accuracy"])


def architecture_params(architecture: str, recipe: Recipe, size: int) -> dict[str, Any]:
    """Constructor arguments stored in the card (and used to rebuild the network)."""
    params: dict[str, Any] = {"in_channels": recipe.channels, "num_classes": len(recipe.labels)}
    if architecture == "BusiCNN":
        params.update(
            widths=[32, 64, 128, 256], blocks_per_stage=1, dropout=0.3, stem_pool=size >= 96
        )
    else:
        params["input_size"] = size
    return params


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_curves(history: list[dict[str, float]], best_epoch: int, title: str, path: Path) -> None:
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train loss (weighted CE)")
    ax_loss.plot(epochs, [h["val_nll"] for h in history], label="val NLL")
    ax_loss.set_xlabel("epoch")
    ax_loss.legend()
    ax_score.plot(epochs, [h["val_accuracy"] for h in history], label="val accuracy")
    ax_score.plot(epochs, [h["val_auc"] for h in history], label="val AUC")
    ax_score.plot(epochs, [h["val_balanced_accuracy"] for h in history], label="val bal. acc.")
    for axis in (ax_loss, ax_score):
        axis.axvline(best_epoch, color="grey", linestyle=":", label="selected")
        axis.grid(alpha=0.3)
    ax_score.set_ylim(0.0, 1.0)
    ax_score.set_xlabel("epoch")
    ax_score.legend(loc="lower right")
    fig.suptitle(f"{title}: training curves")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(
    matrix: Sequence[Sequence[int]], labels: Sequence[str], path: Path, title: str
) -> None:
    """A confusion matrix as a PNG (rows = truth)."""
    plt = _pyplot()
    values = np.asarray(matrix)
    fig, axis = plt.subplots(figsize=(4.8, 4.2))
    axis.imshow(values, cmap="Blues")
    axis.set_xticks(range(len(labels)), labels)
    axis.set_yticks(range(len(labels)), labels)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    for (row, col), count in np.ndenumerate(values):
        colour = "white" if count > values.max() / 2 else "black"
        axis.text(col, row, str(count), ha="center", va="center", color=colour)
    axis.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_roc(
    probabilities: np.ndarray, targets: np.ndarray, labels: Sequence[str], path: Path, title: str
) -> None:
    """ROC curves as a PNG: the positive class for two labels, else one-vs-rest per class and
    normal-vs-abnormal."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _pyplot()
    fig, axis = plt.subplots(figsize=(5, 5))
    curves: list[tuple[str, np.ndarray, np.ndarray]] = []
    if len(labels) == 2:
        curves.append((labels[1], targets == 1, probabilities[:, 1]))
    else:
        for index, label in enumerate(labels):
            curves.append((f"{label} vs rest", targets == index, probabilities[:, index]))
        if "normal" in labels:
            normal = list(labels).index("normal")
            curves.append(("abnormal vs normal", targets != normal, 1 - probabilities[:, normal]))
    for name, truth, score in curves:
        if truth.all() or not truth.any():
            continue
        fpr, tpr, _ = roc_curve(truth, score)
        axis.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(truth, score):.3f})")
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":")
    axis.set_xlabel("false positive rate")
    axis.set_ylabel("true positive rate")
    axis.legend(loc="lower right", fontsize=8)
    axis.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def measure_throughput(model: nn.Module, channels: int, size: int, threads: int,
                       batch: int = 64, repeats: int = 5) -> float:
    """Images per second of the eval-mode forward pass at ``batch`` (median of ``repeats``)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model.eval()
        inputs = torch.randn(batch, channels, size, size)
        timings = []
        with torch.no_grad():
            model(inputs)
            for _ in range(repeats):
                start = time.perf_counter()
                model(inputs)
                timings.append(time.perf_counter() - start)
        return batch / float(np.median(timings))
    finally:
        torch.set_num_threads(previous)


def train(
    modality: str,
    data_dir: Path | None,
    out_dir: Path,
    *,
    architecture: str | None = None,
    epochs: int | None = None,
    seed: int = 0,
    size: int | None = None,
    lr: float | None = None,
    max_minutes: float | None = None,
    wiener_kernel: int = 0,
    split_seed: int | None = None,
    threads: int = 2,
    name: str | None = None,
    version: str = "1.0.0",
    limit: int | None = None,
    weight_decay: float = 0.05,
    batch_size: int | None = None,
    patience: int | None = None,
) -> Path:
    """Train the ``modality`` classifier and write it into ``out_dir``; return the card's path.

    Training stops after ``epochs``, after the recipe's patience without a better validation
    score, or after ``max_minutes`` of wall time, whichever is first; the best validation epoch's
    (exponential moving average) weights are kept. ``limit`` keeps only that many groups per
    split (for quick tests). ``seed`` seeds the weights, the augmentation and the batch order;
    ``split_seed`` (default: ``seed``) the train/val/test split, so that differently seeded
    members of an ensemble can share one split.
    """
    recipe = recipe_for(modality)
    arch = resolve_architecture(architecture or recipe.architecture)
    size = size or recipe.size
    epochs = epochs or recipe.epochs
    lr = lr or recipe.lr
    max_minutes = recipe.max_minutes if max_minutes is None else max_minutes
    name = name or recipe.name
    batch_size = batch_size or recipe.batch_size
    patience = patience or recipe.patience
    data_dir = data_dir if data_dir is not None else shared_data_dir() / recipe.dataset
    labels = recipe.labels
    if recipe.patch_model:
        from inference.train_mammo import train_and_write

        return train_and_write(
            recipe, data_dir, out_dir, architecture=arch, epochs=epochs, seed=seed, size=size,
            lr=lr, max_minutes=max_minutes, threads=threads, name=name, version=version,
            limit=limit, weight_decay=weight_decay, batch_size=batch_size, patience=patience,
            wiener_kernel=wiener_kernel, split_seed=split_seed,
        )
    started = time.monotonic()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    set_determinism(seed=seed)
    previous_track_meta = _track_meta()
    set_track_meta(False)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        samples = recipe.reader(data_dir)
        split_seed = seed if split_seed is None else split_seed
        split = split_by_group(samples, seed=split_seed, labels=labels)
        if limit is not None:
            split = {k: _limit_groups(v, limit) for k, v in split.items()}
        preprocess = preprocess_transform(
            size, recipe.channels, wiener_kernel=wiener_kernel, breast_crop=recipe.breast_crop
        )
        loading = tqdm(total=sum(len(v) for v in split.values()), desc=f"load {recipe.dataset}",
                       unit="img", leave=False)
        datasets = {
            part: ImageDataset(data_dir, items, preprocess, labels, progress=loading.update,
                               loader=_loader(recipe))
            for part, items in split.items()
        }
        loading.close()
        mean: list[float] | None = None
        std: list[float] | None = None
        if recipe.fixed_normalization:
            mean, std = datasets["train"].channel_statistics()
        normalize = normalize_transform(mean, std)
        for dataset in datasets.values():
            dataset.normalize = normalize
        batch_augment: BatchHistologyAugment | None = None
        if recipe.augment_kind == "histopathology":
            # Vectorised on whole batches: augment, then standardise, in the training loop.
            batch_augment = BatchHistologyAugment(seed)
            datasets["train"].normalize = Compose([])
        else:
            augment = augment_transform(size, kind=recipe.augment_kind)
            augment.set_random_state(seed=seed)
            datasets["train"].augment = augment
        generator = torch.Generator().manual_seed(seed)
        train_loader = DataLoader(datasets["train"], batch_size=batch_size, shuffle=True,
                                  drop_last=len(datasets["train"]) > batch_size,
                                  generator=generator)
        val_loader = DataLoader(datasets["val"], batch_size=128)
        test_loader = DataLoader(datasets["test"], batch_size=128)

        counts = np.bincount(datasets["train"].targets, minlength=len(labels)).astype(np.float64)
        class_weights = counts.sum() / (len(labels) * np.maximum(counts, 1.0))
        params = architecture_params(arch, recipe, size)
        model = build_network(arch, params)
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.98), use_buffers=True)
        criterion = nn.CrossEntropyLoss(
            weight=torch.tensor(class_weights, dtype=torch.float32), label_smoothing=0.05
        )
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        steps_per_epoch = len(train_loader)
        warmup_steps = min(3, epochs) * steps_per_epoch
        total_steps = epochs * steps_per_epoch
        deadline = max_minutes * 60.0
        step = 0
        current_lr = lr

        history: list[dict[str, float]] = []
        best_score = -math.inf
        best_epoch = 0
        best_state: dict[str, torch.Tensor] = copy.deepcopy(ema.module.state_dict())
        stop_reason = "epochs"
        progress = tqdm(range(1, epochs + 1), desc=f"train {name} ({arch})", unit="epoch")
        for epoch in progress:
            model.train()
            running = 0.0
            seen = 0
            for images, targets in train_loader:
                elapsed = time.monotonic() - started
                current_lr = learning_rate(lr, step, warmup_steps, total_steps, elapsed, deadline)
                for group in optimizer.param_groups:
                    group["lr"] = current_lr
                optimizer.zero_grad(set_to_none=True)
                if batch_augment is not None:
                    images = standardize_batch(batch_augment(images), mean, std)
                loss = criterion(model(images), targets)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 5.0)
                optimizer.step()
                ema.update_parameters(model)
                step += 1
                running += float(loss.detach()) * len(targets)
                seen += len(targets)
            val_logits, val_targets = predict_logits(ema.module, val_loader)
            val_metrics = evaluation_metrics(softmax(val_logits), val_targets, labels)
            score = selection_score(val_metrics, recipe.modality)
            history.append(
                {
                    "epoch": epoch,
                    "train_loss": running / max(seen, 1),
                    "val_nll": val_metrics["nll"],
                    "val_accuracy": val_metrics["accuracy"],
                    "val_balanced_accuracy": val_metrics["balanced_accuracy"],
                    "val_auc": val_metrics["auc"] or 0.0,
                    "val_score": score,
                    "lr": current_lr,
                    "minutes": (time.monotonic() - started) / 60,
                }
            )
            if score > best_score:
                best_score, best_epoch = score, epoch
                best_state = copy.deepcopy(ema.module.state_dict())
            progress.set_postfix(
                loss=f"{history[-1]['train_loss']:.3f}",
                val_acc=f"{val_metrics['accuracy']:.3f}",
                val_auc=f"{history[-1]['val_auc']:.3f}",
                best=best_epoch,
            )
            if epoch - best_epoch >= patience:
                stop_reason = f"early stop: no better validation score for {patience} epochs"
                break
            if budget_fraction(step, total_steps, time.monotonic() - started, deadline) >= 1.0:
                if step < total_steps:
                    stop_reason = f"wall-time budget of {max_minutes} minutes reached"
                break
        progress.close()

        final = build_network(arch, params)
        final.load_state_dict({k: v.contiguous() for k, v in best_state.items()})
        final.eval()
        # Test-time left-right flip averaging is kept only if it scores better on validation.
        plain_logits, _, val_targets = predict_outputs(final, val_loader)
        plain_score = selection_score(
            evaluation_metrics(softmax(plain_logits), val_targets, labels), recipe.modality
        )
        hflip = False
        flip_score = None
        if recipe.hflip_tta_allowed:
            flip_logits, _, _ = predict_outputs(final, val_loader, hflip=True)
            flip_score = selection_score(
                evaluation_metrics(softmax(flip_logits), val_targets, labels), recipe.modality
            )
            hflip = flip_score > plain_score
        val_logits, val_embeddings, val_targets = predict_outputs(final, val_loader, hflip=hflip)
        temperature = fit_temperature(val_logits, val_targets)
        val_probabilities = softmax(val_logits, temperature)
        val_metrics = evaluation_metrics(val_probabilities, val_targets, labels)

        # Out-of-distribution statistics: training embeddings without augmentation.
        datasets["train"].augment = None
        datasets["train"].normalize = normalize
        train_eval_loader = DataLoader(datasets["train"], batch_size=128)
        _, train_embeddings, train_targets = predict_outputs(final, train_eval_loader, hflip=hflip)
        scorer = MahalanobisScorer.fit(train_embeddings, train_targets)
        val_ood = scorer.score(val_embeddings)
        threshold = float(np.percentile(val_ood, OOD_PERCENTILE))

        # The test split is evaluated once, here, with the selected weights and temperature.
        test_logits, test_embeddings, test_targets = predict_outputs(final, test_loader, hflip)
        test_probabilities = softmax(test_logits, temperature)
        test_metrics = evaluation_metrics(test_probabilities, test_targets, labels)
        test_ood_rate = float(np.mean(scorer.score(test_embeddings) > threshold))
        training_seconds = time.monotonic() - started
        images_per_second = measure_throughput(final, recipe.channels, size, 2)

        weights_path = out_dir / f"{name}.pt"
        torch.save(final.state_dict(), weights_path)
        ood_path = out_dir / f"{name}_ood.npz"
        scorer.save(ood_path)
        parameters = sum(p.numel() for p in final.parameters())
        preprocessing_params: dict[str, Any] = {
            "channels": recipe.channels,
            "breast_crop": recipe.breast_crop,
            "wiener_kernel": wiener_kernel,
            "pad_to": recipe.pad_to,
            "normalization": (
                {"mean": mean, "std": std} if mean is not None else "per_image_zscore"
            ),
        }
        card: dict[str, Any] = {
            "name": name,
            "version": version,
            "modality": recipe.modality,
            "task": recipe.task,
            "intended_use": (
                "research and decision support only; not a medical device; trained on one "
                "small public data set"
            ),
            "architecture": arch,
            "architecture_module": type(final).__module__,
            "architecture_params": params,
            "parameters": parameters,
            "input_size": size,
            "in_channels": recipe.channels,
            "labels": list(labels),
            "preprocessing_params": preprocessing_params,
            "preprocessing": _describe_preprocessing(recipe, size, wiener_kernel, mean is not None),
            "postprocessing": "softmax(logits / temperature)",
            "temperature": temperature,
            "test_time_augmentation": "hflip" if hflip else "none",
            "test_time_augmentation_note": (
                "hflip = logits averaged over the image and its left-right mirror; chosen on "
                f"validation (score {flip_score} with, {plain_score:.4f} without)"
            ),
            "heatmap": "Grad-CAM on the last convolutional stage (features), ReLU, upsampled, 0..1",
            "embedding": f"penultimate features ({getattr(final, 'embedding_size', '?')} values)",
            "ood": ood_section(ood_path, threshold, float(np.mean(val_ood > threshold)),
                               test_ood_rate),
            "weights": weights_path.name,
            "weights_format": "torch.save(state_dict), load with weights_only=True",
            "training_data": training_data_section(recipe, samples),
            "split": {"method": recipe.split_method, "seed": split_seed,
                      **_split_summary(split)},
            "training": {
                "optimizer": f"AdamW peak lr={lr} weight_decay={weight_decay}",
                "schedule": "3-epoch linear warm-up, cosine over max(steps, wall-time budget)",
                "max_minutes": max_minutes,
                "loss": "cross-entropy, inverse-frequency class weights, label smoothing 0.05",
                "class_imbalance": "class-weighted loss (weights below), no resampling",
                "class_weights": dict(zip(labels, [round(float(w), 4) for w in class_weights],
                                          strict=True)),
                "augmentation": recipe.augment_kind + (
                    " (inference.transforms.BatchHistologyAugment)"
                    if recipe.augment_kind == "histopathology"
                    else " (inference.transforms.augment_transform)"
                ),
                "batch_size": batch_size,
                "ema_decay": 0.98,
                "epochs_run": len(history),
                "epochs_max": epochs,
                "selected_epoch": best_epoch,
                "selection": selection_score.__doc__.split("\n\n")[1].strip()
                if selection_score.__doc__ else "",
                "stop_reason": stop_reason,
                "seconds": round(training_seconds, 1),
                "torch_threads": threads,
                "seed": seed,
                "limit_groups_per_split": limit,
            },
            "throughput": {
                "images_per_second_batch64": round(images_per_second, 1),
                "threads": 2,
                "note": "eval forward pass only, on the training machine at the end of training",
            },
            "metrics": {
                "val": val_metrics,
                "test": test_metrics,
                "note": "test = this card's own held-out split, evaluated once",
            },
            **provenance(weights_path, threads),
        }
        card_path = out_dir / f"{name}.json"
        card_path.write_text(json.dumps(card, indent=2) + "\n")
        (out_dir / f"{name}_history.json").write_text(json.dumps(history, indent=1) + "\n")
        title = f"{arch} on {recipe.dataset}"
        _plot_curves(history, best_epoch, title, out_dir / f"{name}_curves.png")
        plot_confusion(test_metrics["confusion_matrix"], labels, out_dir / f"{name}_confusion.png",
                       f"{name}: test split")
        plot_roc(test_probabilities, test_targets, labels, out_dir / f"{name}_roc.png",
                 f"{name}: test split ROC")
        return card_path
    finally:
        set_track_meta(previous_track_meta)
        torch.set_num_threads(previous_threads)
        # flush-to-zero is process-wide: leave the process as we found it (hypothesis, for one,
        # refuses to run with subnormals flushed)
        torch.set_flush_denormal(False)


def ood_section(
    ood_path: Path, threshold: float, val_flagged: float, test_flagged: float
) -> dict[str, Any]:
    """The model card's ``ood`` section for the statistics written to ``ood_path``."""
    return {
        "method": "Mahalanobis distance of the embedding to the nearest class mean "
        "(shared Ledoit-Wolf covariance of the training split), squared",
        "file": ood_path.name,
        "sha256": sha256_of(ood_path),
        "threshold": threshold,
        "threshold_rule": f"{OOD_PERCENTILE:g}th percentile of the validation split",
        "val_flagged": val_flagged,
        "test_flagged": test_flagged,
        "also": "an image with no contrast (max - min < 4 grey levels) is not assessable",
    }


def fit_ood(card_path: Path, data_dir: Path | None = None, seed: int | None = None) -> Path:
    """Fit the out-of-distribution statistics of an existing model on its own training split
    (the card's recipe and seed) and write ``<name>_ood.npz`` plus the card's ``ood`` section.

    For a model trained before OOD scoring existed; the weights are not touched.
    """
    from inference.card import ModelCard
    from inference.classifier import Classifier

    card = ModelCard.from_file(card_path)
    if card.data.get("postprocessing_kind") == "mammo_patch_topk":
        raise ValueError(f"{card.name} is a mammography patch model: its OOD statistics are "
                         "fitted by training (breastcad train --modality MG)")
    recipe = recipe_for(card.modality)
    raw = json.loads(card_path.read_text())
    seed = int(raw.get("split", {}).get("seed", 0)) if seed is None else seed
    data_dir = data_dir if data_dir is not None else shared_data_dir() / recipe.dataset
    classifier = Classifier.from_card(card)
    params = card.preprocessing_params
    preprocess = preprocess_transform(
        card.input_size, int(params["channels"]), wiener_kernel=int(params["wiener_kernel"]),
        breast_crop=bool(params["breast_crop"]),
    )
    split = split_by_group(recipe.reader(data_dir), seed=seed, labels=recipe.labels)
    outputs = {}
    set_track_meta(False)
    for part in SPLIT_NAMES:
        dataset = ImageDataset(data_dir, split[part], preprocess, recipe.labels,
                               normalize=classifier._normalize, loader=_loader(recipe))
        outputs[part] = predict_outputs(
            classifier.module, DataLoader(dataset, batch_size=64), hflip=card.hflip_tta
        )
    scorer = MahalanobisScorer.fit(outputs["train"][1], outputs["train"][2])
    val_scores = scorer.score(outputs["val"][1])
    threshold = float(np.percentile(val_scores, OOD_PERCENTILE))
    ood_path = card_path.with_name(f"{card.name}_ood.npz")
    scorer.save(ood_path)
    raw["ood"] = {
        **ood_section(
            ood_path, threshold, float(np.mean(val_scores > threshold)),
            float(np.mean(scorer.score(outputs["test"][1]) > threshold)),
        ),
        "fitted_after_training": True,
    }
    raw.setdefault("preprocessing_params", card.preprocessing_params)
    card_path.write_text(json.dumps(raw, indent=2) + "\n")
    return card_path


SPLIT_NAMES = ("train", "val", "test")


def _loader(recipe: Recipe) -> Callable[[Path], np.ndarray]:
    """How a recipe reads one training image (edge patches padded white to full size)."""
    if not recipe.pad_to:
        return load_image
    size = recipe.pad_to
    return lambda path: pad_to(load_image(path), size)


def _limit_groups(samples: list[Sample], limit: int) -> list[Sample]:
    """The samples of the first ``limit`` groups of each label (sorted), for quick runs."""
    keep: set[str] = set()
    by_label: dict[str, list[str]] = {}
    for sample in samples:
        by_label.setdefault(sample.label, [])
        if sample.group not in by_label[sample.label]:
            by_label[sample.label].append(sample.group)
    for groups in by_label.values():
        keep.update(sorted(groups)[:limit])
    return [s for s in samples if s.group in keep]


def _describe_preprocessing(recipe: Recipe, size: int, wiener: int, fixed: bool) -> str:
    steps = ["display pixels (uint8 grey or RGB)"]
    if recipe.breast_crop:
        steps.append("chest wall turned to the left (by content) and crop to the breast region")
    steps.append("luma (BT.601)" if recipe.channels == 1 else "RGB")
    steps.append(f"resize to {size}x{size} (bilinear, anti-aliased, aspect ratio not kept)")
    steps.append("scale 0..255 to 0..1")
    if wiener:
        steps.append(f"Wiener filter {wiener}x{wiener} (scipy.signal.wiener)")
    steps.append("per-channel standardisation with the training split's mean/std" if fixed
                 else "per-image z-score")
    return " -> ".join(steps)


def _track_meta() -> bool:
    from monai.data import get_track_meta

    return bool(get_track_meta())


def _monai_version() -> str:
    import monai

    return str(monai.__version__)


def provenance(weights_path: Path, threads: int) -> dict[str, Any]:
    """The card's ``sha256``, ``date``, ``machine`` and ``software`` entries for a run whose
    weights were just written to ``weights_path``."""
    return {
        "sha256": sha256_of(weights_path),
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()} CPU, {threads} threads, no GPU (shared 2-core VM)",
        "software": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "monai": _monai_version(),
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--modality", default="US", choices=sorted(RECIPES))
    parser.add_argument("--arch", default=None, help="architecture (default: the recipe's)")
    parser.add_argument("--data", type=Path, default=None, help="default: the shared data set")
    parser.add_argument("--out", type=Path, default=None, help="output folder")
    parser.add_argument("--fit-ood", type=Path, default=None, metavar="CARD",
                        help="only fit OOD statistics for an existing model card")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split-seed", type=int, default=None,
                        help="seed of the train/val/test split (default: --seed)")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--max-minutes", type=float, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--wiener", type=int, default=0, help="Wiener kernel size (0 = off)")
    parser.add_argument("--name", default=None)
    parser.add_argument("--limit", type=int, default=None, help="groups per label and split")
    parser.add_argument("--model-version", default="1.0.0", help="version written to the card")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for training")
    args = parser.parse_args(argv)
    if args.fit_ood is not None:
        print(f"wrote {fit_ood(args.fit_ood, args.data)}")
        return 0
    if args.out is None:
        parser.error("--out is required")
    card_path = train(
        args.modality, args.data, args.out, architecture=args.arch, epochs=args.epochs,
        seed=args.seed, size=args.size, lr=args.lr, max_minutes=args.max_minutes,
        wiener_kernel=args.wiener, name=args.name, version=args.model_version, limit=args.limit,
        threads=args.threads, split_seed=args.split_seed,
    )
    print(summary_line(card_path))
    return 0


def summary_line(card_path: Path) -> str:
    """One line with a run's test figures, for the console."""
    card = json.loads(card_path.read_text())
    test = card["metrics"]["test"]
    return (
        f"wrote {card_path}: test accuracy {test['accuracy']:.3f}, balanced accuracy "
        f"{test['balanced_accuracy']:.3f}, F1 {test['f1']:.3f}, AUC {test['auc']:.3f}, "
        f"ECE {test['ece']:.3f}, {card['training']['seconds']:.0f} s"
    )


if __name__ == "__main__":
    raise SystemExit(main())
