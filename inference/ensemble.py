"""``breastcad ensemble``: several finished runs of one recipe become one served model.

The runs must share the modality, architecture, input size, preprocessing, labels and the
train/val/test split (``breastcad train --seed S --split-seed 0``); they differ in their training
seed. Their weights go side by side into a ``SeedEnsemble`` (logits averaged), and the ensemble is
then finished exactly as ``breastcad train`` finishes a single run: left-right flip averaging kept
only if it scores better on validation, the temperature fitted on validation, the
out-of-distribution statistics fitted on the training split, and the test split evaluated once.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import set_track_meta
from torch.utils.data import DataLoader

from inference.card import ModelCard
from inference.classifier import Classifier
from inference.datasets import ImageDataset, split_by_group
from inference.metrics import evaluation_metrics, fit_temperature, softmax
from inference.networks import SeedEnsemble
from inference.ood import MahalanobisScorer
from inference.paths import shared_data_dir
from inference.train import (
    OOD_PERCENTILE,
    SPLIT_NAMES,
    _loader,
    _split_summary,
    measure_throughput,
    ood_section,
    plot_confusion,
    plot_roc,
    predict_outputs,
    provenance,
    recipe_for,
    selection_score,
)

# Card fields every member must agree on.
_SHARED_FIELDS = ("modality", "architecture", "architecture_params", "input_size", "in_channels",
                  "labels", "preprocessing_params")


def _member_summary(card: ModelCard) -> dict[str, Any]:
    training = dict(card.data.get("training", {}))
    val = card.data.get("metrics", {}).get("val", {})
    return {
        "name": card.name,
        "version": card.version,
        "sha256": card.sha256,
        "seed": training.get("seed", card.data.get("split", {}).get("seed")),
        "selected_epoch": training.get("selected_epoch"),
        "epochs_run": training.get("epochs_run"),
        "seconds": training.get("seconds"),
        "val_accuracy": val.get("accuracy"),
        "val_auc": val.get("auc"),
        "val_balanced_accuracy": val.get("balanced_accuracy"),
    }


def check_members(cards: Sequence[ModelCard]) -> int:
    """Raise ``ValueError`` unless the cards can be ensembled; return their split seed."""
    if len(cards) < 2:
        raise ValueError(f"an ensemble needs two or more runs, got {len(cards)}")
    first = cards[0]
    if first.architecture == "SeedEnsemble":
        raise ValueError(f"{first.name} {first.version} is an ensemble already")
    if first.data.get("postprocessing_kind"):
        raise ValueError(f"{first.name} is a {first.data['postprocessing_kind']} model: only "
                         "whole-image classifiers (US, SM) can be ensembled")
    for card in cards[1:]:
        for key in _SHARED_FIELDS:
            if card.data.get(key) != first.data.get(key):
                raise ValueError(f"runs differ in {key}: {first.path} and {card.path}")
    seeds = {int(card.data.get("split", {}).get("seed", 0)) for card in cards}
    if len(seeds) != 1:
        raise ValueError(f"runs were trained on different splits (split seeds {sorted(seeds)}): "
                         "train the members with the same --split-seed")
    if len({card.sha256 for card in cards}) != len(cards):
        raise ValueError("the same weights are listed twice")
    return seeds.pop()


def assemble(
    card_paths: Sequence[Path],
    out_dir: Path,
    *,
    data_dir: Path | None = None,
    version: str = "1.0.0",
    threads: int = 2,
) -> Path:
    """Build, calibrate and evaluate the ensemble of the runs whose cards are ``card_paths``;
    write ``<name>.pt``, ``<name>.json``, ``<name>_ood.npz`` and the test figures into
    ``out_dir`` and return the card's path."""
    cards = [ModelCard.from_file(Path(path)) for path in card_paths]
    split_seed = check_members(cards)
    first = cards[0]
    recipe = recipe_for(first.modality)
    labels = first.labels
    members = [Classifier.from_card(card) for card in cards]  # checks every sha256
    params: dict[str, Any] = {
        "in_channels": first.in_channels,
        "num_classes": len(labels),
        "input_size": first.input_size,
        "member_architecture": first.architecture,
        "members": len(cards),
        "member_params": {
            key: value for key, value in dict(first.data["architecture_params"]).items()
            if key not in ("in_channels", "num_classes", "input_size")
        },
    }
    network = SeedEnsemble(**params)
    network.load_members([member.module.state_dict() for member in members])
    network.eval()

    data_dir = data_dir if data_dir is not None else shared_data_dir() / recipe.dataset
    split = split_by_group(recipe.reader(data_dir), seed=split_seed, labels=labels)
    card_params = first.preprocessing_params
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    set_track_meta(False)
    try:
        from inference.transforms import preprocess_transform

        preprocess = preprocess_transform(
            first.input_size, int(card_params["channels"]),
            wiener_kernel=int(card_params["wiener_kernel"]),
            breast_crop=bool(card_params["breast_crop"]),
        )
        loaders = {
            part: DataLoader(
                ImageDataset(data_dir, split[part], preprocess, labels,
                             normalize=members[0]._normalize, loader=_loader(recipe)),
                batch_size=64,
            )
            for part in SPLIT_NAMES
        }
        plain_logits, _, val_targets = predict_outputs(network, loaders["val"])
        plain_score = selection_score(
            evaluation_metrics(softmax(plain_logits), val_targets, labels), recipe.modality)
        hflip, flip_score = False, None
        if recipe.hflip_tta_allowed:
            flip_logits, _, _ = predict_outputs(network, loaders["val"], hflip=True)
            flip_score = selection_score(
                evaluation_metrics(softmax(flip_logits), val_targets, labels), recipe.modality)
            hflip = flip_score > plain_score
        outputs = {part: predict_outputs(network, loader, hflip=hflip)
                   for part, loader in loaders.items()}
        val_logits, val_embeddings, val_targets = outputs["val"]
        temperature = fit_temperature(val_logits, val_targets)
        val_metrics = evaluation_metrics(softmax(val_logits, temperature), val_targets, labels)
        scorer = MahalanobisScorer.fit(outputs["train"][1], outputs["train"][2])
        val_ood = scorer.score(val_embeddings)
        threshold = float(np.percentile(val_ood, OOD_PERCENTILE))
        # The test split is evaluated once, here, with the weights and temperature fixed.
        test_logits, test_embeddings, test_targets = outputs["test"]
        test_probabilities = softmax(test_logits, temperature)
        test_metrics = evaluation_metrics(test_probabilities, test_targets, labels)
        test_flagged = float(np.mean(scorer.score(test_embeddings) > threshold))
        images_per_second = measure_throughput(network, first.in_channels, first.input_size, 2)
    finally:
        torch.set_num_threads(previous_threads)

    out_dir.mkdir(parents=True, exist_ok=True)
    name = first.name
    weights_path = out_dir / f"{name}.pt"
    torch.save(network.state_dict(), weights_path)
    ood_path = out_dir / f"{name}_ood.npz"
    scorer.save(ood_path)
    summaries = [_member_summary(card) for card in cards]
    seconds = sum(float(s["seconds"] or 0.0) for s in summaries)
    card: dict[str, Any] = {
        **{key: value for key, value in first.data.items() if key not in ("throughput",)},
        "version": version,
        "architecture": "SeedEnsemble",
        "architecture_module": SeedEnsemble.__module__,
        "architecture_params": params,
        "parameters": sum(p.numel() for p in network.parameters()),
        "postprocessing": "mean of the members' logits, then softmax(logits / temperature)",
        "temperature": temperature,
        "test_time_augmentation": "hflip" if hflip else "none",
        "test_time_augmentation_note": (
            "hflip = logits averaged over the image and its left-right mirror; chosen on "
            f"validation for the ensemble (score {flip_score} with, {plain_score:.4f} without)"
        ),
        "heatmap": "Grad-CAM on the members' last convolutional stages together (their feature "
                   "maps stacked), ReLU, upsampled, 0..1",
        "embedding": f"the members' penultimate features concatenated ({network.embedding_size} "
                     "values)",
        "ood": ood_section(ood_path, threshold, float(np.mean(val_ood > threshold)),
                           test_flagged),
        "weights": weights_path.name,
        "split": {"method": recipe.split_method, "seed": split_seed, **_split_summary(split)},
        "training": {
            "method": f"{len(cards)} runs of the {recipe.name} recipe with different training "
                      "seeds on one split, trained separately (breastcad train --seed S "
                      f"--split-seed {split_seed}) and assembled by breastcad ensemble",
            "members": summaries,
            "seconds": round(seconds, 1),
            "selection": "each member's epoch by its own validation score; the ensemble's flip "
                         "averaging and temperature on validation",
        },
        "throughput": {
            "images_per_second_batch64": round(images_per_second, 1),
            "threads": 2,
            "note": "eval forward pass only, measured when the ensemble was assembled",
        },
        "metrics": {
            "val": val_metrics,
            "test": test_metrics,
            "note": "test = this card's own held-out split, evaluated once for the ensemble",
        },
        **provenance(weights_path, threads),
    }
    card_path = out_dir / f"{name}.json"
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    plot_confusion(test_metrics["confusion_matrix"], labels, out_dir / f"{name}_confusion.png",
                   f"{name} ensemble of {len(cards)}: test split")
    plot_roc(test_probabilities, test_targets, labels, out_dir / f"{name}_roc.png",
             f"{name} ensemble of {len(cards)}: test split ROC")
    return card_path
