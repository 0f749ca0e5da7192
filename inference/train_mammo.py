"""Training of the mammography patch model (``inference.mammo_patches``) on mini-MIAS.

Called by ``inference.train.train`` for the MG recipe. Every image of the split is turned into
its working view once (chest wall left, breast crop, ``working_height`` rows, z-scored tissue);
each epoch then draws fresh patches from them:

- lesion patches: centred on each annotated lesion of a training image, jittered by up to
  a third of the lesion radius (at most a quarter patch), labelled benign or malignant by the
  lesion's severity;
- tissue patches: centres drawn on breast tissue of the training images, at least
  ``radius + patch / 4`` away from every lesion of the image, labelled normal; after the warm-up
  half of them are hard negatives (the highest-scoring grid patches of normal training images
  under the current weights).

Augmentation on whole batches: the eight flips/rotations, gain and gamma of the z-scored pixels.
Class-weighted cross-entropy (inverse patch frequency); AdamW; EMA of the weights. The epoch is
chosen on the validation split's image-level AUC (normal vs abnormal, top-k pooling; with the
bilateral rule, of the difference from the woman's other breast) averaged with its patch AUC;
then top_k is chosen and Platt scaling (and the bilateral logistic) fitted on validation, and the
test split is evaluated once with everything fixed.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from inference.datasets import Lesion, Sample, load_image, read_mias_lesions
from inference.mammo_patches import (
    PatchSettings,
    WorkingView,
    bilateral_differences,
    bilateral_row,
    cut_patches,
    grid_centres,
    image_embedding,
    image_probabilities,
    label_indices,
    logit,
    padded,
    patch_forward,
    top_score,
    topk_mean,
    working_view,
)
from inference.metrics import evaluation_metrics
from inference.networks import build_network
from inference.schedule import budget_fraction, learning_rate

#: The recipe's patch network (BusiCNN's parameters).
PATCH_NETWORK_PARAMS: dict[str, Any] = {
    "in_channels": 1, "num_classes": 3, "widths": [16, 32, 64, 128],
    "blocks_per_stage": 1, "dropout": 0.3, "stem_pool": True,
}

#: The bilateral rule's weight of the other breast: 1, fixed before the cross-validation of
#: ``bench/mg_cv.py`` measured it (AUC +0.12 over the single-image rule, docs/MODELS.md).
BILATERAL_LAMBDA = 1.0
#: Rows of the working image: 512 (mini-MIAS: 400 micron pixels). bench/mg_cv.py measured 256
#: (800 micron) at out-of-fold AUC 0.55-0.61 in four runs and 512 at 0.57-0.67 in two (the means
#: of their runs' patch maps: 0.554 and 0.632; bilateral 0.609 and 0.682), docs/MODELS.md.
WORKING_HEIGHT = 512
TOP_K_CHOICES: tuple[int, ...] = (1, 2, 3, 5, 8)
#: What chooses the epoch on validation: the mean of the image AUC and the patch AUC (the
#: recipe), or the patch AUC alone (cross-validated lower, docs/MODELS.md).
EpochScore = Literal["image+patch", "patch"]
EPOCH_SCORES: tuple[EpochScore, ...] = ("image+patch", "patch")
VIEW_CHOICES: tuple[int, ...] = (1, 4)


def recipe_settings(patch: int = 64, working_height: int = WORKING_HEIGHT) -> PatchSettings:
    """The MG recipe's patch settings: ``patch`` pixels, a quarter-patch stride, bilateral."""
    return PatchSettings(working_height=working_height, patch=patch,
                         stride=max(4, patch // 4), bilateral_lambda=BILATERAL_LAMBDA)


def patch_network_params(architecture: str, patch: int) -> dict[str, Any]:
    """Constructor arguments of the patch network: the recipe's BusiCNN widths, or any other
    architecture of ``inference.networks`` at the ``patch`` size, one grey channel and the three
    patch classes (tissue, benign lesion, malignant lesion)."""
    if architecture == "BusiCNN":
        return dict(PATCH_NETWORK_PARAMS)
    return {"in_channels": 1, "num_classes": 3, "input_size": patch}


@dataclass
class ViewRecord:
    """A split image ready for patch sampling."""

    sample: Sample
    target: int
    view: WorkingView
    pad: np.ndarray
    lesions: list[tuple[float, float, float, int]]  # working row, col, radius, class 1|2
    grid: np.ndarray


def lesion_positions(view: WorkingView, lesions: Sequence[Lesion], width: int
                     ) -> list[tuple[float, float, float, int]]:
    """Lesions in working-view coordinates: (row, col, radius, 1 benign | 2 malignant)."""
    top, left, _, _ = view.geometry.box
    scale = view.geometry.scale
    out = []
    for lesion in lesions:
        col = (width - 1 - lesion.col) if view.geometry.flipped else lesion.col
        out.append(((lesion.row - top) * scale, (col - left) * scale, lesion.radius * scale,
                    2 if lesion.severity == "M" else 1))
    return out


def build_records(data_dir: Path, samples: Sequence[Sample], labels: Sequence[str],
                  settings: PatchSettings, progress: Any = None) -> list[ViewRecord]:
    all_lesions = read_mias_lesions(data_dir)
    records = []
    for sample in samples:
        image = load_image(data_dir / sample.path)[..., 0]
        view = working_view(image, settings.working_height)
        records.append(ViewRecord(
            sample=sample, target=list(labels).index(sample.label), view=view,
            pad=padded(view, settings.patch),
            lesions=lesion_positions(view, all_lesions.get(sample.path, []), image.shape[1]),
            grid=grid_centres(view, settings),
        ))
        if progress is not None:
            progress(1)
    return records


def _far_from_lesions(record: ViewRecord, row: float, col: float, patch: int) -> bool:
    return all(math.hypot(row - r, col - c) > radius + patch / 4
               for r, c, radius, _ in record.lesions)


def sample_patches(
    records: Sequence[ViewRecord], settings: PatchSettings, rng: np.random.Generator,
    per_lesion: int, negatives: int, hard: Sequence[tuple[int, int, int]] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch's patches and patch labels (0 tissue, 1 benign, 2 malignant)."""
    patch = settings.patch
    patches: list[torch.Tensor] = []
    targets: list[int] = []
    for record in records:
        height, width = record.view.tissue.shape
        for row, col, radius, cls in record.lesions:
            jitter = min(radius / 3.0, patch / 4.0)
            offsets = rng.uniform(-jitter, jitter, size=(per_lesion, 2))
            centres = np.stack([
                np.clip(np.round(row + offsets[:, 0]), 0, height - 1),
                np.clip(np.round(col + offsets[:, 1]), 0, width - 1),
            ], axis=1).astype(np.int64)
            patches.append(cut_patches(record.pad, centres, patch))
            targets.extend([cls] * per_lesion)
    tissue_records = [r for r in records]
    drawn = 0
    random_negatives = negatives - min(len(hard), negatives // 2)
    while drawn < random_negatives:
        record = tissue_records[int(rng.integers(len(tissue_records)))]
        centre = record.grid[int(rng.integers(len(record.grid)))]
        height, width = record.view.tissue.shape
        row = int(np.clip(centre[0] + rng.integers(-settings.stride, settings.stride + 1), 0,
                          height - 1))
        col = int(np.clip(centre[1] + rng.integers(-settings.stride, settings.stride + 1), 0,
                          width - 1))
        if not record.view.tissue[row, col] or not _far_from_lesions(record, row, col, patch):
            continue
        patches.append(cut_patches(record.pad, np.array([[row, col]]), patch))
        targets.append(0)
        drawn += 1
    if hard:
        chosen = rng.choice(len(hard), size=min(len(hard), negatives // 2), replace=False)
        for index in chosen:
            record_index, row, col = hard[int(index)]
            patches.append(cut_patches(records[record_index].pad, np.array([[row, col]]), patch))
            targets.append(0)
    return torch.cat(patches), torch.tensor(targets, dtype=torch.long)


def augment_batch(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The eight flips/rotations (one per batch quarter... per sample), gain and gamma-like
    contrast of z-scored patches."""
    count = images.shape[0]
    out = images.clone()
    flips = torch.randint(0, 2, (count,), generator=generator).bool()
    out[flips] = torch.flip(out[flips], dims=[3])
    vflips = torch.randint(0, 2, (count,), generator=generator).bool()
    out[vflips] = torch.flip(out[vflips], dims=[2])
    transpose = torch.randint(0, 2, (count,), generator=generator).bool()
    out[transpose] = out[transpose].transpose(2, 3)
    gain = 1.0 + 0.15 * (torch.rand(count, 1, 1, 1, generator=generator) * 2 - 1)
    bias = 0.15 * (torch.rand(count, 1, 1, 1, generator=generator) * 2 - 1)
    return out * gain + bias


def image_outputs(
    network: nn.Module, records: Sequence[ViewRecord], settings: PatchSettings, views: int = 1,
    desc: str | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(N, 3) patch probabilities and (N, D) embeddings of every record's grid; with ``desc``,
    a progress bar over the images (scoring a split's grids takes minutes for the heavier
    patch networks)."""
    results = []
    for record in (records if desc is None
                   else tqdm(records, desc=desc, unit="img", leave=False)):
        patches = cut_patches(record.pad, record.grid, settings.patch)
        results.append(patch_forward(network, patches, views=views))
    return results


def patch_auc(network: nn.Module, records: Sequence[ViewRecord], settings: PatchSettings,
              rng_seed: int = 123) -> float:
    """AUC of lesion probability: lesion-centred patches against grid patches away from
    lesions (a fixed draw)."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(rng_seed)
    patches, targets = sample_patches(records, settings, rng, per_lesion=1,
                                      negatives=max(50, 4 * sum(len(r.lesions) for r in records)))
    probabilities, _ = patch_forward(network, patches)
    truth = (targets.numpy() > 0).astype(int)
    if truth.all() or not truth.any():
        return 0.5
    return float(roc_auc_score(truth, probabilities[:, 1] + probabilities[:, 2]))


def image_auc(outputs: Sequence[tuple[np.ndarray, np.ndarray]], targets: np.ndarray,
              top_k: int, women: Sequence[str] = (), lam: float = 0.0) -> float:
    """AUC normal vs abnormal of the top-k image scores; with ``lam`` > 0 and ``women`` (one
    per image), of the bilateral differences where an image has a partner."""
    from sklearn.metrics import roc_auc_score

    scores = np.array([topk_mean(p[:, 1] + p[:, 2], top_k) for p, _ in outputs])
    if len(women) == len(scores):
        scores = ranking_scores(scores, women, lam)
    truth = (targets > 0).astype(int)
    if truth.all() or not truth.any():
        return 0.5
    return float(roc_auc_score(truth, scores))


def bilateral_rows(rows: np.ndarray, scores: Sequence[float], women: Sequence[str],
                   settings: PatchSettings) -> np.ndarray:
    """(N, 3) image probabilities under the card's bilateral rule: an image with a partner
    (the other breast of the same woman) gets p(abnormal) from the difference of the two
    scores, its benign/malignant split kept; the others keep their single-image row."""
    if settings.bilateral_lambda <= 0:
        return rows
    differences = bilateral_differences(scores, women, settings.bilateral_lambda)
    out = rows.copy()
    for index, difference in enumerate(differences):
        if not np.isnan(difference):
            out[index] = bilateral_row(rows[index], float(difference), settings)
    return out


def ranking_scores(scores: np.ndarray, women: Sequence[str], lam: float) -> np.ndarray:
    """Image scores to rank by: with ``lam`` > 0, the bilateral differences (an image without a
    partner: ``(1 - lam)`` times its score, as if the other breast scored the same)."""
    if lam <= 0:
        return scores
    differences = bilateral_differences(scores, women, lam)
    return np.where(np.isnan(differences), (1.0 - lam) * scores, differences)


def fit_logistic(values: np.ndarray, abnormal: np.ndarray) -> tuple[float, float]:
    """p = sigmoid(a * value + b), a lightly regularised logistic regression on one feature."""
    from sklearn.linear_model import LogisticRegression

    if abnormal.all() or not abnormal.any():
        return 1.0, 0.0
    model = LogisticRegression(C=10.0)
    model.fit(np.asarray(values, dtype=np.float64)[:, None], abnormal.astype(int))
    return float(model.coef_[0, 0]), float(model.intercept_[0])


def fit_platt(scores: np.ndarray, abnormal: np.ndarray) -> tuple[float, float]:
    """Platt scaling p = sigmoid(a * logit(score) + b), maximum likelihood (a lightly
    regularised logistic regression on one feature)."""
    return fit_logistic(logit(scores), abnormal)


class ExponentialAverage:
    """An exponential moving average of a model's weights and buffers whose decay warms up as
    min(decay, (1 + step) / (10 + step)), so that short runs (a few dozen steps) are not stuck
    near the initial weights."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model)
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        self.decay = decay
        self.steps = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        self.steps += 1
        for average, current in zip(self.module.state_dict().values(),
                                    model.state_dict().values(), strict=True):
            if average.dtype.is_floating_point:
                average.mul_(decay).add_(current.detach(), alpha=1.0 - decay)
            else:
                average.copy_(current)


@dataclass
class MammoRun:
    """What ``train_patch_model`` hands back to ``inference.train`` for the card."""

    network: nn.Module
    settings: PatchSettings
    history: list[dict[str, float]]
    best_epoch: int
    stop_reason: str
    class_weights: list[float]
    patch_counts: dict[str, int]
    val_probabilities: np.ndarray
    val_targets: np.ndarray
    test_probabilities: np.ndarray
    test_targets: np.ndarray
    embeddings: dict[str, np.ndarray]
    top_k_scores: dict[str, float]
    val_patch_auc: float


def train_patch_model(
    data_dir: Path, split: dict[str, list[Sample]], labels: Sequence[str], *, architecture: str,
    params: dict[str, Any], settings: PatchSettings, epochs: int, lr: float, weight_decay: float,
    batch_size: int, patience: int, max_minutes: float, seed: int, started: float,
    per_lesion: int = 10, negatives_per_lesion: int = 10, hard_after: int = 4,
    hard_every: int = 3, hard_images: int = 40, select_epoch: bool = True,
    select_by: EpochScore = "image+patch",
) -> MammoRun:
    """Train, select, pool and calibrate; see the module docstring. With ``select_epoch``
    False the last epoch's weights are kept (validation still chooses top_k and calibrates):
    ``bench/mg_cv.py`` measured that 36-42 validation images choose the epoch by noise.
    ``select_by``: the validation score that chooses the epoch, ``"image+patch"`` (the mean of
    the image AUC and the patch AUC, the recipe) or ``"patch"`` (the patch AUC alone)."""
    if select_by not in EPOCH_SCORES:
        raise ValueError(f"select_by must be one of {EPOCH_SCORES}, not {select_by!r}")
    loading = tqdm(total=sum(len(v) for v in split.values()), desc="load mini-mias",
                   unit="img", leave=False)
    records = {part: build_records(data_dir, items, labels, settings, loading.update)
               for part, items in split.items()}
    loading.close()
    train_records = records["train"]
    n_lesions = sum(len(r.lesions) for r in train_records)
    negatives = max(64, negatives_per_lesion * n_lesions)
    benign = sum(1 for r in train_records for lesion in r.lesions if lesion[3] == 1)
    counts = np.array([negatives, benign * per_lesion, (n_lesions - benign) * per_lesion],
                      dtype=np.float64)
    class_weights = counts.sum() / (3 * np.maximum(counts, 1.0))
    criterion = nn.CrossEntropyLoss(weight=torch.tensor(class_weights, dtype=torch.float32),
                                    label_smoothing=0.05)
    torch.manual_seed(seed)
    model = build_network(architecture, params)
    ema = ExponentialAverage(model, 0.98)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    val_targets = np.array([r.target for r in records["val"]])
    val_women = [r.sample.group for r in records["val"]]
    normal_train = [i for i, r in enumerate(train_records) if r.target == 0]
    steps_per_epoch = math.ceil((negatives + n_lesions * per_lesion) / batch_size)
    total_steps = epochs * steps_per_epoch
    warmup = min(2, epochs) * steps_per_epoch
    deadline = max_minutes * 60.0
    history: list[dict[str, float]] = []
    best_score, best_epoch = -math.inf, 0
    best_state = copy.deepcopy(ema.module.state_dict())
    hard: list[tuple[int, int, int]] = []
    stop_reason = "epochs"
    step = 0
    progress = tqdm(range(1, epochs + 1), desc=f"train mg patches ({architecture})",
                    unit="epoch")
    for epoch in progress:
        refresh = epoch > hard_after and (epoch - hard_after - 1) % max(hard_every, 1) == 0
        if refresh and normal_train:
            subset = sorted(rng.choice(normal_train, size=min(hard_images, len(normal_train)),
                                       replace=False).tolist())
            hard = _hard_negatives(ema.module, train_records, subset, settings,
                                   per_image=max(1, negatives // (2 * len(subset))))
        patches, targets = sample_patches(train_records, settings, rng, per_lesion, negatives,
                                          hard)
        order = torch.randperm(len(targets), generator=generator)
        model.train()
        running, seen = 0.0, 0
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            if len(index) < 2:
                continue
            current = learning_rate(lr, step, warmup, total_steps, time.monotonic() - started,
                                    deadline)
            for group in optimizer.param_groups:
                group["lr"] = current
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(augment_batch(patches[index], generator)), targets[index])
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            ema.update(model)
            step += 1
            running += float(loss.detach()) * len(index)
            seen += len(index)
        outputs = image_outputs(ema.module, records["val"], settings)
        val_image_auc = image_auc(outputs, val_targets, settings.top_k, val_women,
                                  settings.bilateral_lambda)
        val_patch = patch_auc(ema.module, records["val"], settings)
        score = val_patch if select_by == "patch" else 0.5 * (val_image_auc + val_patch)
        history.append({
            "epoch": epoch, "train_loss": running / max(seen, 1), "val_image_auc": val_image_auc,
            "val_patch_auc": val_patch, "val_score": score, "lr": current,
            "hard_negatives": float(len(hard)), "minutes": (time.monotonic() - started) / 60,
        })
        if score > best_score or not select_epoch:
            best_score, best_epoch = max(score, best_score), epoch
            best_state = copy.deepcopy(ema.module.state_dict())
        progress.set_postfix(loss=f"{history[-1]['train_loss']:.3f}",
                             img_auc=f"{val_image_auc:.3f}", patch_auc=f"{val_patch:.3f}",
                             best=best_epoch)
        if select_epoch and epoch - best_epoch >= patience:
            stop_reason = f"early stop: no better validation score for {patience} epochs"
            break
        if budget_fraction(step, total_steps, time.monotonic() - started, deadline) >= 1.0:
            if step < total_steps:
                stop_reason = f"wall-time budget of {max_minutes} minutes reached"
            break
    progress.close()

    final = build_network(architecture, params)
    final.load_state_dict({k: v.contiguous() for k, v in best_state.items()})
    final.eval()
    finish = finish_patch_model(final, records, settings)
    return MammoRun(
        network=final, settings=finish.settings, history=history, best_epoch=best_epoch,
        stop_reason=stop_reason, class_weights=[float(w) for w in class_weights],
        patch_counts={"tissue": int(counts[0]), "benign": int(counts[1]),
                      "malignant": int(counts[2]), "train_lesions": n_lesions},
        val_probabilities=finish.probabilities["val"], val_targets=finish.targets["val"],
        test_probabilities=finish.probabilities["test"], test_targets=finish.targets["test"],
        embeddings={**finish.embeddings, "train_targets": finish.targets["train"]},
        top_k_scores=finish.top_k_scores, val_patch_auc=finish.val_patch_auc,
    )


@dataclass
class PatchFinish:
    """A patch network's pooling, calibration and outputs, fitted on validation."""

    settings: PatchSettings
    top_k_scores: dict[str, float]
    probabilities: dict[str, np.ndarray]  # per split: (N, 3) image probabilities
    targets: dict[str, np.ndarray]
    embeddings: dict[str, np.ndarray]  # per split: (N, D) image embeddings
    val_patch_auc: float


def finish_patch_model(network: nn.Module, records: dict[str, list[ViewRecord]],
                       settings: PatchSettings) -> PatchFinish:
    """Choose top_k and the test-time flips (1 or 4 views) on validation (a tie keeps the
    cheaper one), fit Platt scaling and, with a bilateral rule, its logistic on validation; then
    the image probabilities and embeddings of every split under those fixed choices. Used for a
    trained run and for an ensemble of runs (``assemble_patch_ensemble``)."""
    val_targets = np.array([r.target for r in records["val"]])
    val_women = [r.sample.group for r in records["val"]]
    top_k_scores: dict[str, float] = {}
    val_by_views = {}
    for views in VIEW_CHOICES:
        val_by_views[views] = image_outputs(network, records["val"], settings, views,
                                            desc=f"score val grids ({views} view(s))")
        for k in TOP_K_CHOICES:
            top_k_scores[f"views={views} top_k={k}"] = image_auc(
                val_by_views[views], val_targets, k, val_women, settings.bilateral_lambda)
    views, top_k = max(
        ((v, k) for v in VIEW_CHOICES for k in TOP_K_CHOICES),
        key=lambda vk: (round(top_k_scores[f"views={vk[0]} top_k={vk[1]}"], 6), -vk[0], -vk[1]),
    )
    val_outputs = val_by_views[views]
    val_scores = np.array([topk_mean(p[:, 1] + p[:, 2], top_k) for p, _ in val_outputs])
    platt_a, platt_b = fit_platt(val_scores, val_targets > 0)
    settings = PatchSettings(**{**settings.as_dict(), "top_k": top_k, "platt_a": platt_a,
                                "platt_b": platt_b, "views": views})
    if settings.bilateral_lambda > 0:
        differences = bilateral_differences(val_scores, val_women, settings.bilateral_lambda)
        paired = ~np.isnan(differences)
        bilateral_a, bilateral_b = fit_logistic(differences[paired], val_targets[paired] > 0)
        settings = PatchSettings(**{**settings.as_dict(), "bilateral_a": bilateral_a,
                                    "bilateral_b": bilateral_b})
    embeddings: dict[str, np.ndarray] = {}
    probabilities: dict[str, np.ndarray] = {}
    for part in ("train", "val", "test"):
        outputs = (val_outputs if part == "val"
                   else image_outputs(network, records[part], settings, settings.views,
                                      desc=f"score {part} grids"))
        rows, vectors, scores = [], [], []
        for patch_probabilities, patch_embeddings in outputs:
            image_p, top = image_probabilities(patch_probabilities, settings)
            rows.append(image_p)
            vectors.append(image_embedding(patch_embeddings, top))
            scores.append(top_score(patch_probabilities, top))
        probabilities[part] = bilateral_rows(
            np.asarray(rows), scores, [r.sample.group for r in records[part]], settings)
        embeddings[part] = np.asarray(vectors)
    return PatchFinish(
        settings=settings, top_k_scores=top_k_scores, probabilities=probabilities,
        targets={part: np.array([r.target for r in records[part]])
                 for part in ("train", "val", "test")},
        embeddings=embeddings, val_patch_auc=patch_auc(network, records["val"], settings),
    )


def _hard_negatives(network: nn.Module, records: Sequence[ViewRecord], normal: Sequence[int],
                    settings: PatchSettings, per_image: int) -> list[tuple[int, int, int]]:
    """The ``per_image`` highest-scoring grid centres of each normal training image."""
    hard = []
    for index in normal:
        record = records[index]
        probabilities, _ = patch_forward(network, cut_patches(record.pad, record.grid,
                                                              settings.patch))
        lesion = probabilities[:, 1] + probabilities[:, 2]
        for position in np.argsort(-lesion)[:per_image]:
            row, col = record.grid[position]
            hard.append((index, int(row), int(col)))
    return hard


def served_metrics(probabilities: np.ndarray, targets: np.ndarray, labels: Sequence[str],
                   settings: PatchSettings) -> dict[str, Any]:
    """``evaluation_metrics`` of image probabilities, the labels by the card's rule
    (``label_index``: the argmax, or the operating point)."""
    return evaluation_metrics(probabilities, targets, labels,
                              label_indices(probabilities, settings))


@dataclass
class ScoredSplit:
    """One split scored by a finished patch model."""

    probabilities: np.ndarray  # (N, 3) image probabilities, the bilateral rule applied
    targets: np.ndarray
    scores: np.ndarray  # pooled image scores (mean of the top_k patch lesion probabilities)
    metrics: dict[str, Any]


def score_splits(network: nn.Module, data_dir: Path, split: dict[str, list[Sample]],
                 labels: Sequence[str], settings: PatchSettings, parts: Sequence[str]
                 ) -> dict[str, ScoredSplit]:
    """The image probabilities, scores and served metrics of ``parts`` of ``split`` under
    ``settings`` (top_k, views, calibration, bilateral rule and operating point fixed)."""
    out = {}
    for part in parts:
        records = build_records(data_dir, split[part], labels, settings)
        rows, scores = [], []
        for patch_probabilities, _ in image_outputs(network, records, settings, settings.views,
                                                    desc=f"score {part} grids"):
            image_p, top = image_probabilities(patch_probabilities, settings)
            rows.append(image_p)
            scores.append(top_score(patch_probabilities, top))
        probabilities = bilateral_rows(np.asarray(rows), scores,
                                       [r.sample.group for r in records], settings)
        targets = np.array([r.target for r in records])
        out[part] = ScoredSplit(probabilities=probabilities, targets=targets,
                                scores=np.asarray(scores),
                                metrics=served_metrics(probabilities, targets, labels, settings))
    return out


def val_metrics(run: MammoRun, labels: Sequence[str]) -> dict[str, Any]:
    return served_metrics(run.val_probabilities, run.val_targets, labels, run.settings)


def _plot_curves(history: Sequence[dict[str, float]], best_epoch: int, path: Path) -> None:
    from inference.train import _pyplot

    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train patch loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.legend()
    ax_score.plot(epochs, [h["val_image_auc"] for h in history],
                  label="val image AUC (normal vs abnormal)")
    ax_score.plot(epochs, [h["val_patch_auc"] for h in history], label="val patch AUC")
    for axis in (ax_loss, ax_score):
        axis.axvline(best_epoch, color="grey", linestyle=":", label="selected")
        axis.grid(alpha=0.3)
    ax_score.set_ylim(0.0, 1.0)
    ax_score.set_xlabel("epoch")
    ax_score.legend(loc="lower right")
    fig.suptitle("mammography patch model on mini-MIAS: training curves")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def benign_vs_malignant_auc(probabilities: np.ndarray, targets: np.ndarray) -> float | None:
    """AUC of p(malignant) / p(abnormal) among the abnormal images (None without both)."""
    from sklearn.metrics import roc_auc_score

    abnormal = targets > 0
    truth = targets[abnormal] == 2
    if truth.all() or not truth.any():
        return None
    share = probabilities[abnormal, 2] / np.maximum(1.0 - probabilities[abnormal, 0], 1e-12)
    return float(roc_auc_score(truth, share))


def postprocessing_text(settings: PatchSettings, fitted_on: str = "validation") -> str:
    """The card's description of how patch outputs become image probabilities and labels;
    ``fitted_on`` names what the calibration was fitted on."""
    text = (
        f"patch softmax (averaged over {settings.views} flips of each patch; 1 or 4 chosen on "
        "validation) -> lesion probability p(benign)+p(malignant) per patch -> image "
        f"score = mean of the top {settings.top_k} patches -> p(abnormal) = "
        f"sigmoid(platt_a * logit(score) + platt_b) (Platt, fitted on {fitted_on}) -> "
        "p(malignant) = p(abnormal) * mean malignant share of the top patches, "
        "p(benign) = the rest of p(abnormal)"
    )
    if settings.bilateral_lambda > 0:
        text += (
            ". In a study with both breasts (workers.mammo), each breast instead gets "
            "p(abnormal) = sigmoid(bilateral_a * (its score - "
            f"{settings.bilateral_lambda:g} x the other breast's score) + bilateral_b) "
            f"(a={settings.bilateral_a:.4f}, b={settings.bilateral_b:.4f}, fitted on the "
            f"pairs of {fitted_on}); the metrics below use that rule for every image whose "
            "partner is in the same split (all of mini-MIAS), as the node would for a "
            "two-breast study"
        )
    if settings.abnormal_threshold is None:
        text += ". Label: the largest of the three probabilities"
    else:
        text += (f". Label (operating point): abnormal when p(abnormal) >= "
                 f"{settings.abnormal_threshold:.4f}, then benign or malignant by the larger "
                 "probability; normal otherwise")
    return text


def write_patch_card(card: dict[str, Any], card_path: Path, data_dir: Path,
                     probe_samples: Sequence[Sample], threads: int, when: str) -> Path:
    """Write ``card``, load it back as a ``MammoPatchClassifier`` (which checks the weights'
    sha256), time it on up to four whole mammograms and write the card again with that
    throughput."""
    import json

    from inference.card import ModelCard
    from inference.mammo_patches import MammoPatchClassifier

    card_path.write_text(json.dumps(card, indent=2) + "\n")
    classifier = MammoPatchClassifier.from_card(ModelCard.from_file(card_path))
    probe = [load_image(data_dir / s.path) for s in probe_samples[:4]]
    timed = time.perf_counter()
    classifier.predict_batch(probe)
    card["throughput"] = {
        "images_per_second": round(len(probe) / max(time.perf_counter() - timed, 1e-9), 2),
        "threads": threads,
        "note": "whole mammograms through MammoPatchClassifier.predict, on the training "
                f"machine {when}",
    }
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    return card_path


def train_and_write(
    recipe: Any, data_dir: Path, out_dir: Path, *, architecture: str, epochs: int, seed: int,
    size: int, lr: float, max_minutes: float, threads: int, name: str, version: str,
    limit: int | None, weight_decay: float, batch_size: int, patience: int, wiener_kernel: int,
    split_seed: int | None = None,
) -> Path:
    """The MG recipe of ``inference.train.train``: train the patch model, fit its OOD
    statistics, evaluate validation and (once) test, and write the run folder; the card's path.
    ``split_seed`` (default: ``seed``) seeds the split, so that runs of several training seeds
    can share one and be ensembled (``breastcad ensemble``)."""
    import json

    from monai.utils import set_determinism

    from inference.datasets import split_by_group
    from inference.mammo_patches import PATCH_POOLING
    from inference.ood import MahalanobisScorer
    from inference.train import (
        OOD_PERCENTILE,
        _limit_groups,
        _split_summary,
        ood_section,
        plot_confusion,
        plot_roc,
        provenance,
        training_data_section,
    )

    if wiener_kernel:
        raise ValueError("the mammography patch model has no Wiener step (use --wiener 0)")
    labels = recipe.labels
    started = time.monotonic()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    set_determinism(seed=seed)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        samples = recipe.reader(data_dir)
        split_seed = seed if split_seed is None else split_seed
        split = split_by_group(samples, seed=split_seed, labels=labels)
        if limit is not None:
            split = {k: _limit_groups(v, limit) for k, v in split.items()}
        settings = recipe_settings(size)
        params = patch_network_params(architecture, settings.patch)
        run = train_patch_model(
            data_dir, split, labels, architecture=architecture, params=params,
            settings=settings, epochs=epochs, lr=lr, weight_decay=weight_decay,
            batch_size=batch_size, patience=patience, max_minutes=max_minutes, seed=seed,
            started=started,
        )
        scorer = MahalanobisScorer.fit(run.embeddings["train"], run.embeddings["train_targets"])
        val_ood = scorer.score(run.embeddings["val"])
        threshold = float(np.percentile(val_ood, OOD_PERCENTILE))
        test_ood_rate = float(np.mean(scorer.score(run.embeddings["test"]) > threshold))
        val_result = served_metrics(run.val_probabilities, run.val_targets, labels,
                                    run.settings)
        # The test split is evaluated once, here, with everything chosen on validation.
        test_result = served_metrics(run.test_probabilities, run.test_targets, labels,
                                     run.settings)
        training_seconds = time.monotonic() - started

        weights_path = out_dir / f"{name}.pt"
        torch.save(run.network.state_dict(), weights_path)
        ood_path = out_dir / f"{name}_ood.npz"
        scorer.save(ood_path)
        embedding_size = int(run.embeddings["val"].shape[1])
        card: dict[str, Any] = {
            "name": name,
            "version": version,
            "modality": "MG",
            "task": recipe.task,
            "intended_use": (
                "research and decision support only; not a medical device; trained on one "
                "small public data set of digitised film (mini-MIAS)"
            ),
            "architecture": architecture,
            "architecture_module": type(run.network).__module__,
            "architecture_params": params,
            "classifier_module": "inference.mammo_patches (MammoPatchClassifier)",
            "parameters": sum(p.numel() for p in run.network.parameters()),
            "input_size": size,
            "input_size_note": f"patch side in working-image pixels; the working image is the "
                               f"mammogram scaled to {settings.working_height} rows",
            "in_channels": 1,
            "labels": list(labels),
            "preprocessing_params": {"channels": 1, "breast_crop": True, "wiener_kernel": 0,
                                     "pad_to": 0, "normalization": "breast_tissue_zscore"},
            "preprocessing": (
                "display pixels (uint8 grey or RGB) -> luma (BT.601) -> chest wall turned to "
                "the left (by content) -> crop to the breast (inference.mammo.breast_bbox) -> "
                f"scale so the whole image would be {settings.working_height} rows (box "
                "filter; mini-MIAS 1024 px at 200 micron -> "
                f"{200 * 1024 // settings.working_height} micron pixels) -> z-score over "
                f"the breast-tissue mask -> {size}x{size} patches on a {settings.stride}-pixel "
                "grid of centres on tissue (padded by half a patch with the background level)"
            ),
            "postprocessing_kind": PATCH_POOLING,
            "postprocessing": postprocessing_text(run.settings),
            "patch_model": run.settings.as_dict(),
            "pooling_validation_auc": run.top_k_scores,
            "temperature": 1.0,
            "calibration": "Platt scaling of the pooled score on the validation split "
                           f"(a={run.settings.platt_a:.4f}, b={run.settings.platt_b:.4f})",
            "test_time_augmentation": (f"patch flips, {run.settings.views} views averaged"
                                       if run.settings.views > 1 else "none"),
            "heatmap": "patch lesion probability on the patch grid, bilinear upsampled to the "
                       "breast crop, placed and un-flipped into the input's frame (0..1, not "
                       "rescaled)",
            "embedding": f"mean patch embedding of the breast, then of the top patches "
                         f"({embedding_size} values)",
            "ood": ood_section(ood_path, threshold, float(np.mean(val_ood > threshold)),
                               test_ood_rate),
            "weights": weights_path.name,
            "weights_format": "torch.save(state_dict), load with weights_only=True",
            "training_data": training_data_section(
                recipe, samples, lesion_annotations="x, y (from the bottom), radius of labels.csv"
            ),
            "split": {"method": recipe.split_method, "seed": split_seed,
                      **_split_summary(split)},
            "training": {
                "seed": seed,
                "optimizer": f"AdamW peak lr={lr} weight_decay={weight_decay}",
                "schedule": "2-epoch linear warm-up, cosine over max(steps, wall-time budget)",
                "max_minutes": max_minutes,
                "loss": "patch cross-entropy (tissue / benign lesion / malignant lesion), "
                        "inverse-frequency class weights, label smoothing 0.05",
                "class_imbalance": "patches drawn per epoch: 10 jittered patches per training "
                                   "lesion and as many tissue patches in total, plus a "
                                   "class-weighted loss",
                "class_weights": dict(zip(("tissue", "benign", "malignant"),
                                          [round(w, 4) for w in run.class_weights],
                                          strict=True)),
                "patches_per_epoch": run.patch_counts,
                "hard_negatives": "from epoch 5, half the tissue patches are the highest-"
                                  "scoring grid patches of 40 random normal training images "
                                  "(refreshed every 3 epochs)",
                "augmentation": "eight flips/rotations, gain and offset of the z-scored pixels "
                                "(inference.train_mammo.augment_batch); lesion-centre jitter",
                "batch_size": batch_size,
                "ema_decay": "0.98, warmed up as min(0.98, (1 + step) / (10 + step))",
                "epochs_run": len(run.history),
                "epochs_max": epochs,
                "selected_epoch": run.best_epoch,
                "selection": "epoch: mean of the validation image AUC (normal vs abnormal, "
                             "top-3 pooling) and the validation patch AUC; then top_k and the "
                             "number of flip views by validation image AUC",
                "stop_reason": run.stop_reason,
                "seconds": round(training_seconds, 1),
                "torch_threads": threads,
                "limit_groups_per_split": limit,
            },
            "metrics": {
                "val": val_result,
                "test": test_result,
                "val_patch_auc": run.val_patch_auc,
                "val_benign_vs_malignant_auc": benign_vs_malignant_auc(
                    run.val_probabilities, run.val_targets),
                "test_benign_vs_malignant_auc": benign_vs_malignant_auc(
                    run.test_probabilities, run.test_targets),
                "note": "test = this card's own held-out split, evaluated once",
            },
            **provenance(weights_path, threads),
        }
        card_path = write_patch_card(card, out_dir / f"{name}.json", data_dir, split["val"],
                                     threads, "at the end of training")
        (out_dir / f"{name}_history.json").write_text(json.dumps(run.history, indent=1) + "\n")
        _plot_curves(run.history, run.best_epoch, out_dir / f"{name}_curves.png")
        plot_confusion(test_result["confusion_matrix"], labels, out_dir / f"{name}_confusion.png",
                       f"{name}: test split")
        plot_roc(run.test_probabilities, run.test_targets, labels, out_dir / f"{name}_roc.png",
                 f"{name}: test split ROC")
        return card_path
    finally:
        torch.set_num_threads(previous_threads)
