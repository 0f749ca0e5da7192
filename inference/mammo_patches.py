"""The mammography patch model: a patch CNN slid over the breast, pooled into an image score.

Whole mammograms shrunk to a few hundred pixels lose the lesions, and 190 training images are too
few for a whole-image CNN to find them (two such runs stayed at chance). Here a compact CNN
(``BusiCNN``) classifies ``patch`` x ``patch`` pixel patches of a working image (the mammogram
scaled to ``working_height`` rows, chest wall turned left, cropped to the breast, z-scored over
the breast tissue) as normal tissue, benign lesion or malignant lesion; it is trained on patches
centred (jittered) on the annotated lesions and on patches of breast tissue away from them.

At inference the network is applied on a grid of patch centres (every ``stride`` working pixels,
centres on breast tissue). The image's abnormality score is the mean of the ``top_k`` highest
patch lesion probabilities (p(benign) + p(malignant)); Platt scaling fitted on the validation
split turns its logit into p(abnormal). The abnormal mass is split between benign and malignant
by the mean malignant share p(malignant) / p(lesion) of the same top patches. The heatmap is the
patch lesion-probability map, upsampled to the crop, put back where the crop came from and
un-flipped, so it lies over the image as it was given. The embedding (similar cases, the
out-of-distribution check) is the mean patch embedding of the breast concatenated with the mean
embedding of the top patches.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from torch import nn

from inference.card import ModelCard
from inference.classifier import Classifier, frozen_network
from inference.mammo import _otsu, breast_bbox, chest_wall_on_right
from inference.ood import MahalanobisScorer
from inference.prediction import Prediction

#: The card's ``postprocessing`` kind that selects this classifier.
PATCH_POOLING = "mammo_patch_topk"


@runtime_checkable
class BilateralPredictor(Protocol):
    """A classifier that can compare a breast with the other one (``MammoPatchClassifier``)."""

    def bilateral_finding(
        self, finding: Prediction, own: Sequence[Prediction], other: Sequence[Prediction]
    ) -> Prediction: ...


@dataclass(frozen=True)
class PatchGeometry:
    """How the working image was made: the original image was flipped (``flipped``), the flipped
    image cropped to ``box`` (top, left, bottom, right, original pixels), and the crop scaled by
    ``scale`` (working pixels per original pixel)."""

    flipped: bool
    box: tuple[int, int, int, int]
    scale: float


@dataclass(frozen=True)
class WorkingView:
    """A mammogram as the patch network sees it: z-scored float32 pixels of the breast crop, the
    breast-tissue mask of the same shape, and where it came from."""

    pixels: npt.NDArray[np.float32]
    tissue: npt.NDArray[np.bool_]
    geometry: PatchGeometry


@dataclass(frozen=True)
class PatchSettings:
    """The card's ``patch_model`` section."""

    working_height: int = 256
    patch: int = 64
    stride: int = 16
    top_k: int = 3
    platt_a: float = 1.0
    platt_b: float = 0.0
    min_tissue: float = 0.5
    views: int = 1
    # Bilateral comparison (a study with both breasts): a breast's score is its views' mean
    # top-k score minus ``bilateral_lambda`` times the other breast's, and p(abnormal) =
    # sigmoid(bilateral_a * difference + bilateral_b). 0 switches it off.
    bilateral_lambda: float = 0.0
    bilateral_a: float = 1.0
    bilateral_b: float = 0.0
    # Operating point: an image is labelled abnormal (benign or malignant, by the larger share)
    # when p(abnormal) >= this threshold, normal otherwise. None: the argmax of the three
    # probabilities (cards before 1.2.0), which needs p(abnormal) > 0.5-0.67 to say abnormal.
    abnormal_threshold: float | None = None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> PatchSettings:
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        return cls(**known)

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def grey_pixels(image: np.ndarray) -> npt.NDArray[np.float32]:
    """uint8 (H, W) or (H, W, 1|3|4) display pixels -> float32 (H, W) luma (BT.601)."""
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(
            f"expected uint8 display pixels, got {array.dtype} "
            "(use inference.image_from_dataset for DICOM pixel data)"
        )
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return np.asarray(array[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114],
                                                                          dtype=np.float32))
    if array.ndim == 3 and array.shape[2] == 1:
        return array[..., 0].astype(np.float32)
    if array.ndim == 2:
        return array.astype(np.float32)
    raise ValueError(f"expected an image of shape (H, W) or (H, W, 3), got {array.shape}")


def working_view(image: np.ndarray, working_height: int = 256) -> WorkingView:
    """Orient (chest wall left, by content), crop to the breast, scale the crop by
    ``working_height / image height`` and z-score it over the breast tissue."""
    grey = grey_pixels(image)
    height, width = grey.shape
    if height < 8 or width < 8:
        raise ValueError(f"image too small to classify: {width}x{height}")
    flipped = chest_wall_on_right(grey)
    oriented = np.ascontiguousarray(grey[:, ::-1]) if flipped else grey
    top, left, bottom, right = breast_bbox(oriented)
    crop = oriented[top:bottom, left:right]
    scale = working_height / height
    out_h = max(8, round(crop.shape[0] * scale))
    out_w = max(8, round(crop.shape[1] * scale))
    small = np.asarray(
        Image.fromarray(crop.astype(np.float32), mode="F").resize(
            (out_w, out_h), Image.Resampling.BOX
        ),
        dtype=np.float32,
    )
    tissue = tissue_mask(small)
    values = small[tissue] if tissue.sum() >= 16 else small.ravel()
    mean = float(values.mean())
    std = max(float(values.std()), 1.0)
    pixels = ((small - mean) / std).astype(np.float32)
    return WorkingView(pixels=pixels, tissue=tissue,
                       geometry=PatchGeometry(flipped=flipped, box=(top, left, bottom, right),
                                              scale=float(out_h) / max(crop.shape[0], 1)))


def tissue_mask(small: np.ndarray) -> npt.NDArray[np.bool_]:
    """Breast tissue of a working image: above half the Otsu threshold, the largest region."""
    threshold = _otsu(small)
    mask = small > max(threshold * 0.5, float(np.percentile(small, 5)) + 1.0)
    labelled, count = ndimage.label(mask)
    if count == 0:
        return np.ones_like(small, dtype=bool)
    sizes = ndimage.sum(mask, labelled, index=np.arange(1, count + 1))
    return np.asarray(labelled == (int(np.argmax(sizes)) + 1))


def padded(view: WorkingView, patch: int) -> npt.NDArray[np.float32]:
    """The working pixels padded by half a patch on every side with the background level."""
    half = patch // 2
    background = float(view.pixels[~view.tissue].mean()) if (~view.tissue).any() else float(
        view.pixels.min())
    return np.pad(view.pixels, half, mode="constant", constant_values=background).astype(
        np.float32)


def grid_centres(view: WorkingView, settings: PatchSettings) -> npt.NDArray[np.int64]:
    """(N, 2) row/column patch centres every ``stride`` pixels whose neighbourhood (a quarter
    patch around the centre) is at least ``min_tissue`` breast tissue; at least one centre."""
    height, width = view.tissue.shape
    stride, radius = settings.stride, max(1, settings.patch // 8)
    rows = np.arange(stride // 2, height, stride)
    cols = np.arange(stride // 2, width, stride)
    coverage = ndimage.uniform_filter(view.tissue.astype(np.float32), size=2 * radius + 1,
                                      mode="constant")
    centres = [(r, c) for r in rows for c in cols if coverage[r, c] >= settings.min_tissue]
    if not centres:
        centres = [(height // 2, width // 2)]
    return np.asarray(centres, dtype=np.int64)


def cut_patches(pad: np.ndarray, centres: np.ndarray, patch: int) -> torch.Tensor:
    """(N, 1, patch, patch) patches of a padded working image at working-image ``centres``
    (the padding is half a patch, so a centre (r, c) starts at row r, column c of ``pad``)."""
    windows = np.lib.stride_tricks.sliding_window_view(pad, (patch, patch))
    rows = np.clip(centres[:, 0], 0, windows.shape[0] - 1)
    cols = np.clip(centres[:, 1], 0, windows.shape[1] - 1)
    return torch.from_numpy(np.ascontiguousarray(windows[rows, cols]))[:, None]


def topk_mean(values: np.ndarray, k: int) -> float:
    """Mean of the ``k`` largest values (all of them if fewer)."""
    ordered = np.sort(np.asarray(values, dtype=np.float64))[::-1]
    return float(ordered[: max(1, min(k, ordered.size))].mean())


def logit(p: float | np.ndarray) -> Any:
    clipped = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(clipped / (1 - clipped))


def sigmoid(value: float) -> float:
    return 1.0 / (1.0 + math.exp(-value))


def split_abnormal(abnormal: float, malignant_share: float) -> npt.NDArray[np.float64]:
    """(normal, benign, malignant) from p(abnormal) and the malignant share of the lesion mass."""
    return np.array([1.0 - abnormal, abnormal * (1.0 - malignant_share),
                     abnormal * malignant_share])


def label_index(values: np.ndarray, settings: PatchSettings) -> int:
    """The served label of (normal, benign, malignant) probabilities under the card's rule: the
    argmax, or with an operating point (``abnormal_threshold``) abnormal when p(abnormal) reaches
    it, then benign or malignant by the larger probability."""
    values = np.asarray(values, dtype=np.float64)
    if settings.abnormal_threshold is None:
        return int(np.argmax(values))
    if 1.0 - float(values[0]) >= settings.abnormal_threshold:
        return 1 + int(np.argmax(values[1:]))
    return 0


def label_indices(rows: np.ndarray, settings: PatchSettings) -> npt.NDArray[np.int64]:
    """``label_index`` of every row of (N, 3) image probabilities."""
    return np.array([label_index(row, settings) for row in np.asarray(rows)], dtype=np.int64)


def bilateral_differences(scores: Sequence[float] | np.ndarray, women: Sequence[str], lam: float
                          ) -> npt.NDArray[np.float64]:
    """Each image's score minus ``lam`` times the mean score of the other images of the same
    woman (her other breast); NaN for an image with no partner (the single-image rule applies
    to it, as in ``MammoPatchClassifier.bilateral_finding``)."""
    values = np.asarray(scores, dtype=np.float64)
    out = np.full(values.shape, np.nan)
    by_woman: dict[str, list[int]] = {}
    for index, woman in enumerate(women):
        by_woman.setdefault(woman, []).append(index)
    for members in by_woman.values():
        for index in members:
            others = [j for j in members if j != index]
            if others:
                out[index] = values[index] - lam * float(values[others].mean())
    return out


def single_image_abnormal(score: float, settings: PatchSettings) -> float:
    """p(abnormal) of an image alone: Platt scaling of its top-k ``score``."""
    return sigmoid(settings.platt_a * float(logit(score)) + settings.platt_b)


def bilateral_abnormal(difference: float, settings: PatchSettings) -> float:
    """p(abnormal) of a breast from the ``difference`` of its score and the other breast's
    (``bilateral_differences``): the card's bilateral logistic."""
    return sigmoid(settings.bilateral_a * difference + settings.bilateral_b)


def bilateral_row(row: np.ndarray, difference: float, settings: PatchSettings
                  ) -> npt.NDArray[np.float64]:
    """(normal, benign, malignant) of a breast under the bilateral rule: p(abnormal) from the
    ``difference`` of its score and the other breast's, the benign/malignant split of ``row``
    (its single-image probabilities) kept."""
    lesion = float(row[1] + row[2])
    share = float(row[2]) / lesion if lesion > 0 else 0.5
    return split_abnormal(bilateral_abnormal(difference, settings), share)


def image_probabilities(
    patch_probabilities: np.ndarray, settings: PatchSettings
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """(normal, benign, malignant) of one image from its (N, 3) patch probabilities, and the
    indices of the top patches used."""
    lesion = patch_probabilities[:, 1] + patch_probabilities[:, 2]
    k = max(1, min(settings.top_k, lesion.size))
    top = np.argsort(-lesion, kind="stable")[:k]
    score = float(lesion[top].mean())
    abnormal = single_image_abnormal(score, settings)
    return split_abnormal(abnormal, malignant_share(patch_probabilities, top)), top.astype(
        np.int64)


def malignant_share(patch_probabilities: np.ndarray, top: np.ndarray) -> float:
    """The mean malignant share of the lesion probability of the ``top`` patches."""
    lesion = patch_probabilities[top, 1] + patch_probabilities[top, 2]
    return float(np.mean(patch_probabilities[top, 2] / np.maximum(lesion, 1e-9)))


def top_score(patch_probabilities: np.ndarray, top: np.ndarray) -> float:
    """The image score: the mean lesion probability of the ``top`` patches."""
    return float((patch_probabilities[top, 1] + patch_probabilities[top, 2]).mean())


class MammoPatchClassifier(Classifier):
    """Classifies whole mammograms with a patch network (see the module docstring).

    Same interface as ``Classifier`` (``predict``, ``predict_batch``, ``card``, ``labels``,
    ``module``, ``ood_scorer``); deterministic, no state between calls.
    """

    def __init__(
        self, card: ModelCard, network: nn.Module, ood_scorer: MahalanobisScorer | None = None
    ) -> None:
        self.card = card
        self.module = frozen_network(network)
        self.settings = PatchSettings.from_mapping(card.data.get("patch_model", {}))
        self.ood_scorer = ood_scorer
        self.ood_threshold = float(card.ood.get("threshold", math.inf))

    def with_backend(self, backend: str) -> MammoPatchClassifier:
        """The patch model stays in eager PyTorch whatever ``inference_backend`` says: its
        network runs on batches of patches (``patch_forward``), not through the whole-image
        trunk that ``Classifier.with_backend`` compiles. An unknown backend is still refused."""
        from inference.backends import check_backend

        check_backend(backend)
        self.backend = "eager"
        return self

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """The (N, 1, P, P) patches of the image's breast grid."""
        view = working_view(image, self.settings.working_height)
        centres = grid_centres(view, self.settings)
        return cut_patches(padded(view, self.settings.patch), centres, self.settings.patch)

    def predict_batch(self, images: Sequence[np.ndarray], batch_size: int = 16) -> list[Prediction]:
        """Classify several mammograms (any sizes), one after another."""
        del batch_size  # every image is already a batch of patches
        return [self._predict_one(image) for image in images]

    def patch_outputs(
        self, image: np.ndarray
    ) -> tuple[WorkingView, np.ndarray, np.ndarray, np.ndarray]:
        """The working view, grid centres, (N, 3) patch probabilities and (N, D) embeddings."""
        grey_pixels(image)  # type and shape checks first, with their clear messages
        view = working_view(image, self.settings.working_height)
        centres = grid_centres(view, self.settings)
        patches = cut_patches(padded(view, self.settings.patch), centres, self.settings.patch)
        probabilities, embeddings = patch_forward(self.module, patches, self.card.temperature,
                                                  views=self.settings.views)
        return view, centres, probabilities, embeddings

    def _predict_one(self, image: np.ndarray) -> Prediction:
        view, centres, patch_probabilities, patch_embeddings = self.patch_outputs(image)
        probabilities, top = image_probabilities(patch_probabilities, self.settings)
        embedding = image_embedding(patch_embeddings, top)
        score = (None if self.ood_scorer is None
                 else float(self.ood_scorer.score(embedding[None])[0]))
        pixels = np.asarray(image)
        no_contrast = int(pixels.max()) - int(pixels.min()) < 4
        not_assessable = no_contrast or (score is not None and score > self.ood_threshold)
        lesion = patch_probabilities[:, 1] + patch_probabilities[:, 2]
        heatmap = self._heatmap(view, centres, lesion, (int(pixels.shape[0]), int(pixels.shape[1])))
        label = self.labels[label_index(probabilities, self.settings)]
        return Prediction(
            modality=self.card.modality,
            label=label,
            labels=self.labels,
            probabilities={name: float(p) for name, p in zip(self.labels, probabilities,
                                                             strict=True)},
            model_name=self.card.name,
            model_version=self.card.version,
            model_sha256=self.card.sha256,
            heatmap=heatmap,
            embedding=embedding,
            ood_score=score,
            not_assessable=not_assessable,
            extra={"heatmap": "patch lesion probability (benign + malignant) on a "
                              f"{self.settings.stride}-pixel grid of the working image"},
            raw_score=top_score(patch_probabilities, top),
        )

    def bilateral_finding(
        self, finding: Prediction, own: Sequence[Prediction], other: Sequence[Prediction]
    ) -> Prediction:
        """A breast's finding compared with the other breast of the same study.

        ``finding`` is the breast's finding from its own views (``own``), ``other`` the other
        breast's view predictions. Dense tissue tends to look alike on both sides and a lesion
        does not, so p(abnormal) comes from the difference of the two breasts' mean top-k
        scores (``PatchSettings.bilateral_*``; cross-validated in ``bench/mg_cv.py``); the
        benign/malignant split keeps ``finding``'s. ``finding`` is returned unchanged when the
        card has no bilateral rule or either side has no assessable view with a score."""
        lam = self.settings.bilateral_lambda
        own_scores = [p.raw_score for p in own if p.raw_score is not None and not p.not_assessable]
        other_scores = [p.raw_score for p in other
                        if p.raw_score is not None and not p.not_assessable]
        if lam <= 0 or not own_scores or not other_scores:
            return finding
        difference = float(np.mean(own_scores)) - lam * float(np.mean(other_scores))
        values = bilateral_row(np.array([finding.probabilities[name] for name in self.labels]),
                               difference, self.settings)
        probabilities = {name: float(v) for name, v in zip(self.labels, values, strict=True)}
        return replace(
            finding,
            label=self.labels[label_index(values, self.settings)],
            probabilities=probabilities,
            extra={**finding.extra, "bilateral": (
                f"compared with the other breast: score {np.mean(own_scores):.3f} - "
                f"{lam:g} x {np.mean(other_scores):.3f} = {difference:.3f}")},
        )

    def _heatmap(self, view: WorkingView, centres: np.ndarray, lesion: np.ndarray,
                 shape: tuple[int, int]) -> npt.NDArray[np.float32]:
        stride = self.settings.stride
        height, width = view.tissue.shape
        grid = np.zeros((math.ceil(height / stride), math.ceil(width / stride)), np.float32)
        grid[centres[:, 0] // stride, centres[:, 1] // stride] = lesion
        top, left, bottom, right = view.geometry.box
        fine = F.interpolate(
            torch.from_numpy(grid)[None, None],
            size=(grid.shape[0] * stride, grid.shape[1] * stride), mode="bilinear",
            align_corners=False,
        )[0, 0, :height, :width]
        region = F.interpolate(fine[None, None], size=(bottom - top, right - left),
                               mode="bilinear", align_corners=False)[0, 0].numpy()
        canvas = np.zeros(shape, dtype=np.float32)
        canvas[top:bottom, left:right] = np.clip(region, 0.0, 1.0)
        if view.geometry.flipped:
            canvas = canvas[:, ::-1]
        return np.ascontiguousarray(canvas, dtype=np.float32)


def dihedral(patches: torch.Tensor, index: int) -> torch.Tensor:
    """View ``index`` (0-7) of the eight flips/rotations of (N, C, H, W) patches: 0 identity,
    1 left-right, 2 up-down, 3 both, 4-7 the same after a transpose."""
    out = patches.transpose(2, 3) if index >= 4 else patches
    if index % 4 in (1, 3):
        out = torch.flip(out, dims=[3])
    if index % 4 in (2, 3):
        out = torch.flip(out, dims=[2])
    return out


@torch.no_grad()
def patch_forward(
    network: nn.Module, patches: torch.Tensor, temperature: float = 1.0, batch: int = 256,
    views: int = 1,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float32]]:
    """(N, 3) softmax(logits / temperature) and (N, D) embeddings of patches, eval mode; with
    ``views`` > 1 both are averaged over the first ``views`` flips/rotations (``dihedral``)."""
    network.eval()
    probabilities: list[np.ndarray] = []
    embeddings: list[np.ndarray] = []
    for start in range(0, patches.shape[0], batch):
        chunk = patches[start : start + batch]
        stacked = torch.cat([dihedral(chunk, index) for index in range(views)])
        features = network.forward_features(stacked)  # type: ignore[operator]
        embedding = network.embed(features)  # type: ignore[operator]
        logits = network.classify(embedding)  # type: ignore[operator]
        softmax = torch.softmax(logits / temperature, dim=1).view(views, len(chunk), -1)
        probabilities.append(softmax.mean(dim=0).double().numpy())
        embeddings.append(embedding.view(views, len(chunk), -1).mean(dim=0).float().numpy())
    return np.concatenate(probabilities), np.concatenate(embeddings)


def image_embedding(patch_embeddings: np.ndarray, top: np.ndarray) -> npt.NDArray[np.float32]:
    """The image's embedding: mean patch embedding of the breast, then of the top patches."""
    return np.ascontiguousarray(
        np.concatenate([patch_embeddings.mean(axis=0), patch_embeddings[top].mean(axis=0)]),
        dtype=np.float32,
    )


def is_patch_card(card: ModelCard) -> bool:
    """Whether a card describes a mammography patch model."""
    return str(card.data.get("postprocessing_kind", "")) == PATCH_POOLING


def classifier_from_card(card: ModelCard, weights: Path | None = None) -> Classifier:
    """The classifier a card describes: a ``MammoPatchClassifier`` for a patch card, else a
    ``Classifier``."""
    if is_patch_card(card):
        return MammoPatchClassifier.from_card(card, weights)
    return Classifier.from_card(card, weights)
