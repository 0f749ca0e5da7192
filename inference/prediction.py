"""The result of analysing one image: the only type other packages take from `inference`."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class Prediction:
    """What a classifier says about one image.

    ``heatmap`` is a float32 array in [0, 1] with the same height and width as the image that was
    passed to the classifier (Grad-CAM on the last convolutional block, resized back).
    ``embedding`` is the penultimate-layer feature vector (for similar-case retrieval).
    ``raw_score`` is the uncalibrated image score of models that combine images before
    calibrating (the mammography patch model's top-k lesion probability, compared across the two
    breasts of a study); None for the others.
    """

    modality: str
    label: str
    labels: tuple[str, ...]
    probabilities: dict[str, float]
    model_name: str
    model_version: str
    model_sha256: str
    heatmap: npt.NDArray[np.float32]
    embedding: npt.NDArray[np.float32]
    ood_score: float | None = None
    not_assessable: bool = False
    extra: dict[str, str] = field(default_factory=dict)
    raw_score: float | None = None

    def __post_init__(self) -> None:
        if self.label not in self.labels:
            raise ValueError(f"label {self.label!r} is not one of {self.labels}")
        if set(self.probabilities) != set(self.labels):
            raise ValueError("probabilities must have exactly one entry per label")
        if self.heatmap.ndim != 2:
            raise ValueError("heatmap must be a 2-D array")

    @property
    def probability(self) -> float:
        """Probability of the predicted label."""
        return self.probabilities[self.label]

    def to_json(self) -> dict[str, object]:
        return {
            "modality": self.modality,
            "label": self.label,
            "probabilities": {k: round(float(v), 6) for k, v in self.probabilities.items()},
            "model": self.model_name,
            "model_version": self.model_version,
            "model_sha256": self.model_sha256,
            "not_assessable": self.not_assessable,
            "ood_score": self.ood_score,
        }
