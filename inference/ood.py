"""Out-of-distribution score: Mahalanobis distance of an image's embedding to the training data.

Fitted once after training on the training split's embeddings (class means and one shared,
Ledoit-Wolf-shrunk covariance, as in Lee et al. 2018); the score of an embedding is its smallest
squared Mahalanobis distance to a class mean. The threshold is a high percentile of the
validation split's scores, so about that share of breast images like the training data are
flagged; anything further (a kidney ultrasound, a chest X-ray, a blank frame) is "not assessable".
Stored beside the weights as ``<name>_ood.npz`` with its SHA-256 in the card.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class MahalanobisScorer:
    """Class means (K, D) and the shared precision matrix (D, D)."""

    means: npt.NDArray[np.float64]
    precision: npt.NDArray[np.float64]

    @classmethod
    def fit(cls, embeddings: np.ndarray, targets: np.ndarray) -> MahalanobisScorer:
        from sklearn.covariance import LedoitWolf

        data = np.asarray(embeddings, dtype=np.float64)
        labels = np.asarray(targets)
        classes = sorted(set(labels.tolist()))
        means = np.stack([data[labels == k].mean(axis=0) for k in classes])
        centred = data - means[np.searchsorted(classes, labels)]
        covariance = LedoitWolf().fit(centred).covariance_
        return cls(means=means, precision=np.linalg.pinv(covariance))

    def score(self, embeddings: np.ndarray) -> npt.NDArray[np.float64]:
        """Smallest squared Mahalanobis distance to a class mean, one per row."""
        data = np.atleast_2d(np.asarray(embeddings, dtype=np.float64))
        distances = []
        for mean in self.means:
            delta = data - mean
            distances.append(np.einsum("nd,de,ne->n", delta, self.precision, delta))
        return np.asarray(np.min(np.stack(distances), axis=0))

    def save(self, path: Path) -> None:
        with path.open("wb") as handle:
            np.savez(handle, means=self.means, precision=self.precision)

    @classmethod
    def load(cls, path: Path) -> MahalanobisScorer:
        with np.load(path, allow_pickle=False) as data:
            return cls(means=np.asarray(data["means"]), precision=np.asarray(data["precision"]))
