"""The mammography pipeline: one orientation for the model, per image, per breast, per study.

Per image:
- display pixels (``inference.image_from_dataset``: Modality LUT, VOI LUT or window, MONOCHROME1
  inverted, 16-bit; For Processing images through their PixelIntensityRelationship), scaled
  down (box filter) to at most ``mg_max_side`` pixels on the longer side (a 4k x 3k detector
  image costs seconds in every full-size step: resampling for the model, Grad-CAM upsampling,
  the overlay, and a 38 MB SC; 2048 px of a 24 cm detector is still about 120 micron, finer
  than the 200 micron films of mini-MIAS); the SC shows this image;
- flipped to the common orientation (chest wall left, as a left breast is hung) by
  PatientOrientation, else ImageLaterality/Laterality (``inference.dicom_pixels.mammo_flips``),
  else, with neither, by which half of the image holds more tissue;
- classified (the MG classifier crops to the breast itself and returns its heatmap in the frame
  of the image it was given), and the heatmap flipped back, so the SC shows the image as
  received with the heatmap where the model looked.
The unit is the study: the worker gives all MG images of the study, whatever their series (a
screening study often comes as four series of one view each). Per breast: the views (CC, MLO,
...) of one side are combined by the mean of their class probabilities (each view is another
look at the same breast); the breast's heatmap is its most suspicious view's. When both breasts
are in the study and the model has a bilateral rule (``bilateral_finding``: the mammography
patch model's card sets ``patch_model.bilateral_lambda``), each breast's probabilities come from
comparing its score with the other breast's instead. Images with no laterality form an
"unknown side" group, never compared. Per study (the result row, triage, and the SR's study
group when there are two breast groups): the most suspicious breast, since a screening study is
as suspicious as its worse breast.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset

from inference import Prediction
from inference.dicom_pixels import image_laterality, mammo_flips, view_position
from inference.mammo_patches import BilateralPredictor
from reports.sr import FindingGroup
from workers.analysis import (
    ImageAnalysis,
    Predictor,
    SeriesAnalysis,
    decode,
    mean_prediction,
    suspicion_key,
)

BREAST_TRACKING_IDENTIFIER = {"L": "breastcad left breast", "R": "breastcad right breast",
                              None: "breastcad breast, side unknown"}
STUDY_TRACKING_IDENTIFIER = "breastcad study finding"


def _flip(array: np.ndarray, flip_lr: bool, flip_ud: bool) -> np.ndarray:
    if flip_lr:
        array = array[:, ::-1]
    if flip_ud:
        array = array[::-1]
    return np.ascontiguousarray(array)


def _flips_from_pixels(image: np.ndarray) -> tuple[bool, bool]:
    """Chest wall on the side with more tissue: flip left-right if the right half is brighter."""
    gray = image.mean(axis=2) if image.ndim == 3 else image
    half = gray.shape[1] // 2
    return bool(gray[:, half:].mean() > gray[:, :half].mean()), False


def _reduce(image: np.ndarray, max_side: int | None) -> np.ndarray:
    """The image scaled down (box filter) so that its longer side is at most ``max_side``."""
    longest = max(image.shape[0], image.shape[1])
    if max_side is None or longest <= max_side:
        return image
    scale = max_side / longest
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX), dtype=np.uint8)


def analyse_instance(
    ds: Dataset, classifier: Predictor, max_side: int | None = None
) -> ImageAnalysis:
    """One mammogram; ``max_side`` caps the analysed (and shown) image's longer side."""
    full = decode(ds, 0)
    image = _reduce(full, max_side)
    flips = mammo_flips(ds)
    source_of_flips = "attributes"
    if flips is None:
        flips = _flips_from_pixels(image)
        source_of_flips = "pixels"
    prediction = classifier.predict(_flip(image, *flips))
    heatmap = _flip(prediction.heatmap, *flips)
    return ImageAnalysis(
        source=ds,
        image=image,
        prediction=replace(prediction, heatmap=heatmap),
        details={
            "laterality": image_laterality(ds),
            "view_position": view_position(ds),
            "flipped_left_right": flips[0],
            "flipped_up_down": flips[1],
            "orientation_from": source_of_flips,
            "analysed_size": [int(image.shape[0]), int(image.shape[1])],
        },
    )


def breast_groups(
    analyses: Sequence[ImageAnalysis], classifier: Predictor | None = None,
) -> tuple[list[FindingGroup], list[dict[str, object]]]:
    """One finding group per breast (R, L, then unknown side), with facts for the result row;
    with both breasts and a ``BilateralPredictor``, each compared with the other."""
    sides: dict[str | None, list[int]] = {}
    for index, analysis in enumerate(analyses):
        sides.setdefault(image_laterality(analysis.source), []).append(index)
    findings: dict[str | None, Prediction] = {}
    for side, members in sides.items():
        predictions = [analyses[i].prediction for i in members]
        findings[side] = mean_prediction(predictions, max(predictions, key=suspicion_key))
    if isinstance(classifier, BilateralPredictor) and "L" in sides and "R" in sides:
        views = {side: [analyses[i].prediction for i in sides[side]] for side in ("L", "R")}
        findings["R"], findings["L"] = (
            classifier.bilateral_finding(findings["R"], views["R"], views["L"]),
            classifier.bilateral_finding(findings["L"], views["L"], views["R"]),
        )
    groups: list[FindingGroup] = []
    details: list[dict[str, object]] = []
    for side in ("R", "L", None):
        indices = sides.get(side)
        if not indices:
            continue
        finding = findings[side]
        groups.append(FindingGroup(
            prediction=finding,
            source_indices=tuple(indices),
            laterality=side,
            tracking_identifier=BREAST_TRACKING_IDENTIFIER[side],
        ))
        details.append(_group_detail("breast", side, finding, analyses, indices))
    return groups, details


def _group_detail(
    scope: str,
    side: str | None,
    finding: Prediction,
    analyses: Sequence[ImageAnalysis],
    indices: Sequence[int],
) -> dict[str, object]:
    return {
        "scope": scope,
        "laterality": side,
        "label": finding.label,
        "probabilities": dict(finding.probabilities),
        "views": [view_position(analyses[i].source) for i in indices],
        "sop_instance_uids": [str(analyses[i].source.SOPInstanceUID) for i in indices],
        # the images the finding used: 1-based index in the result (its heatmap), series, view
        "images": [
            {
                "index": i + 1,
                "sop_instance_uid": str(analyses[i].source.SOPInstanceUID),
                "series_instance_uid": str(analyses[i].source.get("SeriesInstanceUID", "")),
                "view_position": view_position(analyses[i].source),
            }
            for i in indices
        ],
    }


def analyse_series(
    datasets: Sequence[Dataset], classifier: Predictor, max_side: int | None = None
) -> SeriesAnalysis:
    """A mammography study (all its MG images, whatever their series): per image, per breast,
    and the study finding, the more suspicious breast. With two or more breast groups the SR
    also gets the study's own group (Finding Site breast, laterality "right and left" when both
    sides were seen) over all the images."""
    analyses = [analyse_instance(ds, classifier, max_side) for ds in datasets]
    groups, details = breast_groups(analyses, classifier)
    study = max(groups, key=lambda group: suspicion_key(group.prediction)).prediction
    if len(groups) > 1:
        sides = {group.laterality for group in groups}
        side = "B" if {"L", "R"} <= sides else None
        indices = tuple(range(len(analyses)))
        groups.append(FindingGroup(
            prediction=study,
            source_indices=indices,
            laterality=side,
            tracking_identifier=STUDY_TRACKING_IDENTIFIER,
        ))
        details.append(_group_detail("study", side, study, analyses, indices))
    return SeriesAnalysis(
        analyses=analyses, series_prediction=study, groups=groups, group_details=details
    )
