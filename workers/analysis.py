"""What every modality pipeline gives back, and the generic (one frame, whole image) pipeline.

A pipeline turns the datasets of one series into a :class:`SeriesAnalysis`: per analysed
instance the display image the radiologist sees (the frame shown in the heatmap SC), the
prediction whose heatmap is in that image's frame, and the series finding (with optional finding
groups, e.g. one per breast). The pipelines raise :class:`PipelineError` with a precise reason
for input they cannot analyse; the task turns it into the job's reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from pydicom.dataset import Dataset

from inference import Prediction, image_from_dataset
from inference.stages import stage
from reports.sr import FindingGroup
from reports.triage import suspicion


class PipelineError(ValueError):
    """The series (or one of its instances) cannot be analysed; the message says why."""


class Predictor(Protocol):
    """What a pipeline needs of a classifier (``inference.Classifier`` has it)."""

    def predict(self, image: np.ndarray) -> Prediction: ...

    def predict_batch(
        self, images: Sequence[np.ndarray], batch_size: int = 16
    ) -> list[Prediction]: ...


@dataclass(frozen=True)
class ImageAnalysis:
    """One analysed instance.

    ``image``: uint8 RGB display pixels of the frame shown in the SC (Rows x Columns, in the
    orientation the radiologist sees); ``prediction``: the instance's finding, its heatmap in
    the frame of ``image``; ``frame_number``: 1-based frame of a multi-frame source the image
    and heatmap show (None for single-frame); ``details``: facts for the result row (frames
    analysed, crop, flips, view).
    """

    source: Dataset
    image: np.ndarray
    prediction: Prediction
    frame_number: int | None = None
    details: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class SeriesAnalysis:
    """A series' analysed instances, its finding and (optionally) its finding groups."""

    analyses: list[ImageAnalysis]
    series_prediction: Prediction
    groups: list[FindingGroup] | None = None
    # facts for the result row about the groups (e.g. per breast), in the order of ``groups``
    group_details: list[dict[str, object]] = field(default_factory=list)


def decode(ds: Dataset, frame: int = 0) -> np.ndarray:
    """Display pixels of one frame, or PipelineError naming the instance and the decoder's
    reason."""
    try:
        with stage("decode"):
            return image_from_dataset(ds, frame=frame)
    except ValueError as exc:
        raise PipelineError(
            f"cannot decode the pixels of instance {ds.SOPInstanceUID}: {exc}"
        ) from exc


def suspicion_key(prediction: Prediction) -> float:
    """How suspicious a prediction is: its probability of malignancy, else (a model without a
    malignant class) the probability of its predicted label."""
    value = suspicion(prediction.probabilities)
    return float(value) if value is not None else float(prediction.probability)


def mean_prediction(predictions: Sequence[Prediction], heatmap_of: Prediction) -> Prediction:
    """The mean class probabilities (and embedding) of ``predictions``; the label is the most
    probable class of the mean; the heatmap is ``heatmap_of``'s."""
    if not predictions:
        raise ValueError("no predictions to combine")
    if len(predictions) == 1 and predictions[0] is heatmap_of:
        return predictions[0]
    first = predictions[0]
    mean = {
        label: float(np.mean([p.probabilities[label] for p in predictions]))
        for label in first.labels
    }
    label = max(first.labels, key=lambda name: mean[name])
    ood = [p.ood_score for p in predictions if p.ood_score is not None]
    return Prediction(
        modality=first.modality,
        label=label,
        labels=first.labels,
        probabilities=mean,
        model_name=first.model_name,
        model_version=first.model_version,
        model_sha256=first.model_sha256,
        heatmap=heatmap_of.heatmap,
        embedding=np.mean([p.embedding for p in predictions], axis=0).astype(np.float32),
        ood_score=max(ood) if ood else None,
        not_assessable=all(p.not_assessable for p in predictions),
        extra=dict(heatmap_of.extra),
    )


def aggregate(predictions: Sequence[Prediction]) -> Prediction:
    """The series finding: mean class probabilities; the heatmap of its most confident image."""
    if len(predictions) == 1:
        return predictions[0]
    mean = mean_prediction(predictions, predictions[0])
    best = max(predictions, key=lambda p: p.probabilities[mean.label])
    return mean_prediction(predictions, best)


def analyse_generic(datasets: Sequence[Dataset], classifier: Predictor) -> SeriesAnalysis:
    """Frame 0 of every instance, whole image; the series finding is the mean."""
    analyses: list[ImageAnalysis] = []
    for ds in datasets:
        image = decode(ds, 0)
        analyses.append(ImageAnalysis(source=ds, image=image, prediction=classifier.predict(image)))
    return SeriesAnalysis(
        analyses=analyses, series_prediction=aggregate([a.prediction for a in analyses])
    )
