"""``breastcad ensemble``: several finished runs of one recipe become one served model.

The runs must share the modality, architecture, input size, preprocessing, labels and the
train/val/test split (``breastcad train --seed S --split-seed 0``); they differ in their training
seed. Their weights go side by side into a ``SeedEnsemble`` (logits averaged), and the ensemble is
then finished exactly as ``breastcad train`` finishes a single run: left-right flip averaging kept
only if it scores better on validation, the temperature fitted on validation, the
out-of-distribution statistics fitted on the training split, and the test split evaluated once.

Mammography patch models (MG) are ensembled the same way at the patch level: the members' patch
logits are averaged, and top_k, the flip views, Platt scaling and the bilateral logistic are
chosen and fitted again on validation for the ensemble (``assemble_patch_ensemble``).
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
from inference.datasets import ImageDataset, split_by_group
from inference.mammo_patches import PATCH_POOLING, PatchSettings, classifier_from_card
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
# ... and, for mammography patch models, the patch geometry and the bilateral weight (top_k,
# flips and the calibration are chosen again for the ensemble).
_SHARED_PATCH_FIELDS = ("working_height", "patch", "stride", "min_tissue", "bilateral_lambda")


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
    kind = first.data.get("postprocessing_kind")
    if kind and kind != PATCH_POOLING:
        raise ValueError(f"{first.name} is a {kind} model: only whole-image classifiers (US, "
                         "SM) and mammography patch models (MG) can be ensembled")
    for card in cards[1:]:
        for key in (*_SHARED_FIELDS, "postprocessing_kind"):
            if card.data.get(key) != first.data.get(key):
                raise ValueError(f"runs differ in {key}: {first.path} and {card.path}")
        if kind:
            mine, theirs = first.data["patch_model"], card.data["patch_model"]
            for key in _SHARED_PATCH_FIELDS:
                if mine.get(key) != theirs.get(key):
                    raise ValueError(f"runs differ in patch_model.{key}: {first.path} and "
                                     f"{card.path}")
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
    members = [classifier_from_card(card) for card in cards]  # checks every sha256
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
    if first.data.get("postprocessing_kind") == PATCH_POOLING:
        return assemble_patch_ensemble(cards, network, params, out_dir, data_dir=data_dir,
                                       split_seed=split_seed, version=version, threads=threads)
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

    name = first.name
    card: dict[str, Any] = _ensemble_card(
        cards, network, params, scorer, out_dir, version=version, split=split,
        split_seed=split_seed, threads=threads,
        ood=(threshold, float(np.mean(val_ood > threshold)), test_flagged),
        selection="each member's epoch by its own validation score; the ensemble's flip "
                  "averaging and temperature on validation",
    )
    card.update({
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
    })
    card_path = out_dir / f"{name}.json"
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    plot_confusion(test_metrics["confusion_matrix"], labels, out_dir / f"{name}_confusion.png",
                   f"{name} ensemble of {len(cards)}: test split")
    plot_roc(test_probabilities, test_targets, labels, out_dir / f"{name}_roc.png",
             f"{name} ensemble of {len(cards)}: test split ROC")
    return card_path


def assemble_patch_ensemble(
    cards: Sequence[ModelCard],
    network: SeedEnsemble,
    params: dict[str, Any],
    out_dir: Path,
    *,
    data_dir: Path,
    split_seed: int,
    version: str,
    threads: int,
) -> Path:
    """The MG half of ``assemble``: the members' patch networks as one ``SeedEnsemble`` (patch
    logits averaged), finished as ``breastcad train`` finishes a patch run
    (``inference.train_mammo.finish_patch_model``: top_k, flips, Platt and the bilateral
    logistic chosen and fitted on validation), OOD statistics on the training split, and the
    test split evaluated once."""
    from inference.train_mammo import (
        benign_vs_malignant_auc,
        build_records,
        finish_patch_model,
        postprocessing_text,
        served_metrics,
        write_patch_card,
    )

    first = cards[0]
    recipe = recipe_for(first.modality)
    labels = first.labels
    settings = PatchSettings.from_mapping(first.data["patch_model"])
    split = split_by_group(recipe.reader(data_dir), seed=split_seed, labels=labels)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        records = {part: build_records(data_dir, split[part], labels, settings)
                   for part in SPLIT_NAMES}
        finish = finish_patch_model(network, records, finish_settings(settings))
        scorer = MahalanobisScorer.fit(finish.embeddings["train"], finish.targets["train"])
        val_ood = scorer.score(finish.embeddings["val"])
        threshold = float(np.percentile(val_ood, OOD_PERCENTILE))
        val_metrics = served_metrics(finish.probabilities["val"], finish.targets["val"],
                                     labels, finish.settings)
        # The test split is evaluated once, here, with everything chosen on validation.
        test_probabilities, test_targets = finish.probabilities["test"], finish.targets["test"]
        test_metrics = served_metrics(test_probabilities, test_targets, labels,
                                      finish.settings)
        test_flagged = float(np.mean(scorer.score(finish.embeddings["test"]) > threshold))
    finally:
        torch.set_num_threads(previous_threads)

    name = first.name
    final = finish.settings
    card = _ensemble_card(
        cards, network, params, scorer, out_dir, version=version, split=split,
        split_seed=split_seed, threads=threads,
        ood=(threshold, float(np.mean(val_ood > threshold)), test_flagged),
        selection="each member's epoch by its own validation score; the ensemble's top_k, "
                  "flips, Platt scaling and bilateral logistic on validation",
    )
    card.update({
        "postprocessing": "mean of the members' patch logits, then "
                          + postprocessing_text(final),
        "patch_model": final.as_dict(),
        "pooling_validation_auc": finish.top_k_scores,
        "calibration": "Platt scaling of the pooled score on the validation split "
                       f"(a={final.platt_a:.4f}, b={final.platt_b:.4f}), for the ensemble",
        "test_time_augmentation": (f"patch flips, {final.views} views averaged"
                                   if final.views > 1 else "none"),
        "embedding": "mean patch embedding of the breast, then of the top patches (the "
                     f"members' embeddings concatenated: {finish.embeddings['val'].shape[1]} "
                     "values)",
        "metrics": {
            "val": val_metrics,
            "test": test_metrics,
            "val_patch_auc": finish.val_patch_auc,
            "val_benign_vs_malignant_auc": benign_vs_malignant_auc(
                finish.probabilities["val"], finish.targets["val"]),
            "test_benign_vs_malignant_auc": benign_vs_malignant_auc(
                test_probabilities, test_targets),
            "note": "test = this card's own held-out split, evaluated once for the ensemble",
        },
    })
    card_path = write_patch_card(card, out_dir / f"{name}.json", data_dir, split["val"], threads,
                                 "when the ensemble was assembled")
    plot_confusion(test_metrics["confusion_matrix"], labels, out_dir / f"{name}_confusion.png",
                   f"{name} ensemble of {len(cards)}: test split")
    plot_roc(test_probabilities, test_targets, labels, out_dir / f"{name}_roc.png",
             f"{name} ensemble of {len(cards)}: test split ROC")
    return card_path


def finish_settings(settings: PatchSettings) -> PatchSettings:
    """A member's patch settings with what the ensemble chooses again (top_k, flips, Platt,
    the bilateral logistic) set back to their defaults."""
    return PatchSettings(working_height=settings.working_height, patch=settings.patch,
                         stride=settings.stride, min_tissue=settings.min_tissue,
                         bilateral_lambda=settings.bilateral_lambda)


def _ensemble_card(
    cards: Sequence[ModelCard],
    network: SeedEnsemble,
    params: dict[str, Any],
    scorer: MahalanobisScorer,
    out_dir: Path,
    *,
    version: str,
    split: dict[str, Any],
    split_seed: int,
    threads: int,
    ood: tuple[float, float, float],
    selection: str,
) -> dict[str, Any]:
    """Save the ensemble's weights and OOD statistics into ``out_dir`` and return the card
    fields every ensemble has: the first member's card with the ensemble's architecture,
    weights, OOD section (``ood`` = threshold, validation and test flagged rates), split,
    members and provenance."""
    first = cards[0]
    recipe = recipe_for(first.modality)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights_path = out_dir / f"{first.name}.pt"
    torch.save(network.state_dict(), weights_path)
    ood_path = out_dir / f"{first.name}_ood.npz"
    scorer.save(ood_path)
    summaries = [_member_summary(card) for card in cards]
    return {
        **{key: value for key, value in first.data.items() if key not in ("throughput",)},
        "version": version,
        "architecture": "SeedEnsemble",
        "architecture_module": SeedEnsemble.__module__,
        "architecture_params": params,
        "parameters": sum(p.numel() for p in network.parameters()),
        "ood": ood_section(ood_path, *ood),
        "weights": weights_path.name,
        "split": {"method": recipe.split_method, "seed": split_seed, **_split_summary(split)},
        "training": {
            "method": f"{len(cards)} runs of the {recipe.name} recipe with different training "
                      "seeds on one split, trained separately (breastcad train --seed S "
                      f"--split-seed {split_seed}) and assembled by breastcad ensemble",
            "members": summaries,
            "seconds": round(sum(float(s["seconds"] or 0.0) for s in summaries), 1),
            "selection": selection,
        },
        **provenance(weights_path, threads),
    }
