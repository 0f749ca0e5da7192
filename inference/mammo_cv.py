"""Out-of-fold patch maps of the mammography recipe, and what is fitted on them.

``bench/mg_cv.py train`` cross-validates the MG patch recipe on the development women (the
split's train + validation; the test split is never loaded) and writes each fold's held-out grid
patch probabilities to ``fold<k>.npz``. Every development image then has a patch map from a model
that never saw its woman. This module reads those maps (several runs' maps averaged, as the
recipe's seed ensemble averages its members) and fits on all development images what 42
validation images fit poorly (docs/MODELS.md, "mg_mias"):

- the Platt scaling of the pooled score and the bilateral logistic, and
- the operating point: the threshold on p(abnormal) at which an image is labelled abnormal,
  chosen where the out-of-fold balanced accuracy (Youden's J) is highest.

``recalibrate`` puts them into a finished patch model's card (``breastcad recalibrate``); the
weights are not touched. The maps come from fold models, not from the model being recalibrated:
they stand in for its scores on unseen women, which holds only as far as the fold models score
like it (same recipe, members and pooling; ``recalibrate`` reports both on the validation
images, which have both).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from inference.mammo_patches import (
    PatchSettings,
    bilateral_abnormal,
    bilateral_differences,
    single_image_abnormal,
    topk_mean,
)


def write_fold(target: Path, images: Sequence[dict[str, Any]], **facts: float) -> None:
    """One fold's held-out images (path, patient, side, target, (N, 3) patch probabilities
    ``p``, (N, 2) grid ``centres``, working ``shape``) as the npz ``load_images`` reads."""
    arrays: dict[str, Any] = {
        "paths": np.array([im["path"] for im in images]),
        "patients": np.array([im["patient"] for im in images]),
        "sides": np.array([im["side"] for im in images]),
        "targets": np.array([im["target"] for im in images]),
        **{name: np.array(value) for name, value in facts.items()},
    }
    for index, image in enumerate(images):
        arrays[f"p{index}"] = np.asarray(image["p"], dtype=np.float32)
        arrays[f"c{index}"] = np.asarray(image["centres"])
        arrays[f"s{index}"] = np.array(image["shape"])
    np.savez_compressed(target, **arrays)


def load_images(out: Path) -> list[dict[str, Any]]:
    """The images of every ``fold*.npz`` in ``out`` (``write_fold``'s fields)."""
    images = []
    for path in sorted(out.glob("fold*.npz")):
        data = np.load(path)
        for index, image_path in enumerate(data["paths"]):
            images.append({
                "path": str(image_path), "patient": str(data["patients"][index]),
                "side": str(data["sides"][index]), "target": int(data["targets"][index]),
                "p": data[f"p{index}"], "centres": data[f"c{index}"],
                "shape": tuple(int(v) for v in data[f"s{index}"]),
            })
    return images


def load_ensemble(outs: Sequence[Path]) -> list[dict[str, Any]]:
    """Out-of-fold images of several runs on the same folds, patch probabilities averaged (the
    grids are the same: they depend on the image only). Sorted by path."""
    if not outs:
        raise ValueError("no out-of-fold folders given")
    runs = [sorted(load_images(out), key=lambda im: im["path"]) for out in outs]
    for out, run in zip(outs, runs, strict=True):
        if not run:
            raise ValueError(f"no fold*.npz in {out}: run `python bench/mg_cv.py train` first")
    images = runs[0]
    for out, other in zip(outs[1:], runs[1:], strict=True):
        if [im["path"] for im in other] != [im["path"] for im in images]:
            raise ValueError(f"{out} does not hold the same images as {outs[0]}")
    for index, image in enumerate(images):
        for other in runs[1:]:
            if not np.array_equal(other[index]["centres"], image["centres"]):
                raise ValueError(f"{image['path']}: different patch grids")
        image["p"] = np.mean([run[index]["p"] for run in runs], axis=0)
    return images


def youden_threshold(p: np.ndarray, truth: np.ndarray) -> tuple[float, float, float]:
    """The threshold on ``p`` (abnormal when p >= it) with the highest sensitivity +
    specificity, halfway between the last score it calls abnormal and the next lower one; and
    the sensitivity and specificity it gives on these images. A tie keeps the higher
    threshold."""
    values = np.asarray(p, dtype=np.float64)
    positive = np.asarray(truth, dtype=bool)
    if positive.all() or not positive.any():
        raise ValueError("an operating point needs both normal and abnormal images")
    candidates = np.unique(values)[::-1]  # every distinct score, highest first
    best, best_j = 0, -np.inf
    for index, cut in enumerate(candidates):
        called = values >= cut
        j = called[positive].mean() + (~called[~positive]).mean() - 1.0
        if j > best_j + 1e-12:
            best, best_j = index, float(j)
    upper = float(candidates[best])
    lower = float(candidates[best + 1]) if best + 1 < candidates.size else upper
    threshold = 0.5 * (upper + lower) if lower < upper else upper
    called = values >= threshold
    return (threshold, float(called[positive].mean()), float((~called[~positive]).mean()))


@dataclass(frozen=True)
class CrossValidatedCalibration:
    """Platt scaling, bilateral logistic and operating point fitted on out-of-fold scores."""

    platt_a: float
    platt_b: float
    bilateral_a: float
    bilateral_b: float
    abnormal_threshold: float
    images: int
    abnormal: int
    auc: float
    sensitivity: float
    specificity: float
    sources: tuple[str, ...]

    def applied_to(self, settings: PatchSettings) -> PatchSettings:
        return replace(settings, platt_a=self.platt_a, platt_b=self.platt_b,
                       bilateral_a=self.bilateral_a, bilateral_b=self.bilateral_b,
                       abnormal_threshold=self.abnormal_threshold)

    def as_card(self) -> dict[str, Any]:
        return {
            "abnormal_threshold": self.abnormal_threshold,
            "rule": "abnormal (benign or malignant, by the larger probability) when p(abnormal) "
                    ">= abnormal_threshold, else normal",
            "chosen_by": "the highest balanced accuracy (Youden's J) on out-of-fold scores",
            "fitted_on": f"{self.images} development images ({self.abnormal} abnormal), "
                         "out of fold (bench/mg_cv.py; the test split never loaded)",
            "out_of_fold": {"auc_normal_vs_abnormal": self.auc,
                            "sensitivity": self.sensitivity, "specificity": self.specificity},
            "calibration": {"platt_a": self.platt_a, "platt_b": self.platt_b,
                            "bilateral_a": self.bilateral_a, "bilateral_b": self.bilateral_b},
            "sources": list(self.sources),
        }


def pooled_scores(images: Sequence[dict[str, Any]], top_k: int) -> npt.NDArray[np.float64]:
    """Each image's score: the mean of its ``top_k`` highest patch lesion probabilities."""
    return np.array([topk_mean(im["p"][:, 1] + im["p"][:, 2], top_k) for im in images])


def abnormal_probabilities(scores: np.ndarray, women: Sequence[str], settings: PatchSettings
                           ) -> npt.NDArray[np.float64]:
    """p(abnormal) of each image under ``settings``: the bilateral logistic where the woman's
    other breast is among the images, Platt scaling of the score otherwise."""
    single = np.array([single_image_abnormal(float(s), settings) for s in scores])
    if settings.bilateral_lambda <= 0:
        return single
    differences = bilateral_differences(scores, women, settings.bilateral_lambda)
    paired = ~np.isnan(differences)
    out = single.copy()
    out[paired] = [bilateral_abnormal(float(d), settings) for d in differences[paired]]
    return out


def cross_validated_calibration(images: Sequence[dict[str, Any]], settings: PatchSettings,
                                sources: Sequence[str] = ()) -> CrossValidatedCalibration:
    """Platt scaling, the bilateral logistic (when ``settings`` has a bilateral rule) and the
    operating point, all fitted on the out-of-fold ``images`` pooled with ``settings.top_k``."""
    from sklearn.metrics import roc_auc_score

    from inference.train_mammo import fit_logistic, fit_platt

    scores = pooled_scores(images, settings.top_k)
    abnormal = np.array([im["target"] > 0 for im in images])
    women = [im["patient"] for im in images]
    platt_a, platt_b = fit_platt(scores, abnormal)
    fitted = replace(settings, platt_a=platt_a, platt_b=platt_b)
    if settings.bilateral_lambda > 0:
        differences = bilateral_differences(scores, women, settings.bilateral_lambda)
        paired = ~np.isnan(differences)
        if paired.any():
            bilateral_a, bilateral_b = fit_logistic(differences[paired], abnormal[paired])
            fitted = replace(fitted, bilateral_a=bilateral_a, bilateral_b=bilateral_b)
    p = abnormal_probabilities(scores, women, fitted)
    threshold, sensitivity, specificity = youden_threshold(p, abnormal)
    return CrossValidatedCalibration(
        platt_a=fitted.platt_a, platt_b=fitted.platt_b, bilateral_a=fitted.bilateral_a,
        bilateral_b=fitted.bilateral_b, abnormal_threshold=threshold, images=len(images),
        abnormal=int(abnormal.sum()), auc=float(roc_auc_score(abnormal, p)),
        sensitivity=sensitivity, specificity=specificity, sources=tuple(sources))


def recalibrate(card_path: Path, cv_dirs: Sequence[Path], out_dir: Path, *,
                data_dir: Path | None = None, version: str | None = None, threads: int = 2
                ) -> Path:
    """A finished MG patch model with its calibration and operating point fitted on the
    out-of-fold maps in ``cv_dirs`` (their mean): the weights and OOD statistics are copied
    unchanged into ``out_dir``, the validation and test splits are scored again under the new
    rule, and the card is written there. Returns the new card's path."""
    import torch

    from inference.card import ModelCard
    from inference.datasets import split_by_group
    from inference.mammo_patches import classifier_from_card, is_patch_card
    from inference.paths import shared_data_dir
    from inference.train import plot_confusion, plot_roc, recipe_for
    from inference.train_mammo import postprocessing_text, score_splits, write_patch_card

    card = ModelCard.from_file(card_path)
    if not is_patch_card(card):
        raise ValueError(f"{card_path} is not a mammography patch model card")
    settings = PatchSettings.from_mapping(card.data["patch_model"])
    if settings.views != 1:
        raise ValueError("the out-of-fold maps are of one view; the card averages "
                         f"{settings.views} flip views")
    images = load_ensemble(cv_dirs)
    heights = [im["shape"][0] for im in images]
    if max(heights) > settings.working_height or max(heights) <= settings.working_height // 2:
        raise ValueError(f"the out-of-fold maps were not made at {settings.working_height} "
                         f"working rows (tallest breast {max(heights)} rows)")
    recipe = recipe_for(card.modality)
    data_dir = data_dir or shared_data_dir() / recipe.dataset
    labels = card.labels
    split = split_by_group(recipe.reader(data_dir), seed=int(card.data["split"]["seed"]),
                           labels=labels)
    test_paths = {s.path for s in split["test"]}
    leaked = sorted(im["path"] for im in images if im["path"] in test_paths)
    if leaked:
        raise ValueError(f"{len(leaked)} out-of-fold image(s) are in the card's test split "
                         f"(first {leaked[0]}): the maps must come from the development women")
    calibration = cross_validated_calibration(images, settings,
                                              [str(path) for path in cv_dirs])
    final = calibration.applied_to(settings)

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        classifier = classifier_from_card(card)
        scored = score_splits(classifier.module, data_dir, split, labels, final, ("val", "test"))
    finally:
        torch.set_num_threads(previous_threads)
    # The validation women have both: the model's own scores and the fold models'.
    by_path = {im["path"]: im for im in images}
    val_paths = [s.path for s in split["val"]]
    fold_scores = pooled_scores([by_path[p] for p in val_paths if p in by_path], final.top_k)

    out_dir.mkdir(parents=True, exist_ok=True)
    for source in (card.weights_path, card.ood_path):
        if source is not None and source.resolve() != (out_dir / source.name).resolve():
            shutil.copyfile(source, out_dir / source.name)
    data = json.loads(card_path.read_text())
    metrics = dict(data.get("metrics", {}))
    metrics.update({
        "val": scored["val"].metrics, "test": scored["test"].metrics,
        "note": "test = this card's own held-out split, scored again after the operating "
                "point and calibration were fitted on out-of-fold scores (the weights, top_k "
                "and views unchanged)",
    })
    data.update({
        "version": version or data["version"],
        "patch_model": final.as_dict(),
        "postprocessing": (data["postprocessing"].split("patch softmax")[0] + postprocessing_text(
            final, fitted_on="out-of-fold scores of the development women")),
        "calibration": f"cross-validated: Platt scaling (a={final.platt_a:.4f}, "
                       f"b={final.platt_b:.4f}) and the bilateral logistic "
                       f"(a={final.bilateral_a:.4f}, b={final.bilateral_b:.4f}) fitted on "
                       f"{calibration.images} development images out of fold (bench/mg_cv.py, "
                       "inference.mammo_cv); replaces the validation fit",
        "operating_point": {
            **calibration.as_card(),
            "validation_scores": {
                "model_median": float(np.median(scored["val"].scores)),
                "fold_models_median": float(np.median(fold_scores)) if fold_scores.size
                else None,
                "note": "median pooled score of the validation images by this model and by "
                        "the fold models that never saw them: the operating point transfers "
                        "only as far as these agree",
            },
        },
        "metrics": metrics,
    })
    new_card = write_patch_card(data, out_dir / card_path.name, data_dir, split["val"],
                                threads, "when it was recalibrated")
    name = card.name
    plot_confusion(scored["test"].metrics["confusion_matrix"], labels,
                   out_dir / f"{name}_confusion.png", f"{name} {data['version']}: test split")
    plot_roc(scored["test"].probabilities, scored["test"].targets, labels,
             out_dir / f"{name}_roc.png", f"{name} {data['version']}: test split ROC")
    return new_card
