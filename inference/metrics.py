"""Classification metrics for model cards (needs scikit-learn, the ``train`` extra)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    scaled = logits / temperature
    scaled = scaled - scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return np.asarray(exp / exp.sum(axis=1, keepdims=True))


def nll(probabilities: np.ndarray, targets: np.ndarray) -> float:
    picked = probabilities[np.arange(len(targets)), targets]
    return float(-np.mean(np.log(np.clip(picked, 1e-12, 1.0))))


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The temperature in [0.25, 5] minimising the negative log-likelihood (grid search)."""
    grid = np.round(np.arange(0.25, 5.0001, 0.01), 2)
    losses = [nll(softmax(logits, float(t)), targets) for t in grid]
    return float(grid[int(np.argmin(losses))])


def classification_metrics(
    probabilities: np.ndarray, targets: np.ndarray, labels: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro F1, macro one-vs-rest AUC, per-class AUC, the
    normal-vs-abnormal AUC (when ``normal`` is a label), NLL and the confusion matrix
    (rows = truth, columns = prediction, in ``labels`` order)."""
    predicted = probabilities.argmax(axis=1)
    indices = list(range(len(labels)))
    per_class_auc: dict[str, float | None] = {}
    for i, label in enumerate(labels):
        positive = targets == i
        if positive.all() or not positive.any():
            per_class_auc[label] = None
        else:
            per_class_auc[label] = float(roc_auc_score(positive, probabilities[:, i]))
    valid = [v for v in per_class_auc.values() if v is not None]
    result: dict[str, Any] = {
        "n": int(len(targets)),
        "accuracy": float(accuracy_score(targets, predicted)),
        "balanced_accuracy": float(balanced_accuracy_score(targets, predicted)),
        "macro_f1": float(f1_score(targets, predicted, average="macro", labels=indices)),
        "macro_auc_ovr": float(np.mean(valid)) if valid else None,
        "auc_per_class_ovr": per_class_auc,
        "nll": nll(probabilities, targets),
        "confusion_matrix": confusion_matrix(targets, predicted, labels=indices).tolist(),
        "confusion_matrix_axes": "rows = true label, columns = predicted label",
    }
    if "normal" in labels:
        normal = list(labels).index("normal")
        abnormal = targets != normal
        if abnormal.any() and not abnormal.all():
            result["auc_normal_vs_abnormal"] = float(
                roc_auc_score(abnormal, 1.0 - probabilities[:, normal])
            )
    return result
