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
    probabilities: np.ndarray, targets: np.ndarray, labels: Sequence[str],
    predicted: np.ndarray | None = None,
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro F1, macro one-vs-rest AUC, per-class AUC, the
    normal-vs-abnormal AUC (when ``normal`` is a label), NLL and the confusion matrix
    (rows = truth, columns = prediction, in ``labels`` order). ``predicted``: the label indices
    the model serves, when its rule is not the argmax of ``probabilities`` (an MG card's
    operating point); the AUCs, NLL and ECE always come from ``probabilities``."""
    predicted = _predicted(probabilities, predicted)
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


def expected_calibration_error(
    probabilities: np.ndarray, targets: np.ndarray, bins: int = 10
) -> float:
    """ECE of the top-label confidence: sum over equal-width confidence bins of
    |accuracy - mean confidence| weighted by the bin's share of samples."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == targets
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            total += float(inside.mean()) * abs(float(correct[inside].mean())
                                                - float(confidence[inside].mean()))
    return total


def calibrated_ece_reference(
    probabilities: np.ndarray, draws: int = 2000, bins: int = 10, seed: int = 0
) -> dict[str, float]:
    """What :func:`expected_calibration_error` gives for a *perfectly* calibrated model with these
    confidences: each image is drawn correct with probability equal to its top-label confidence,
    ``draws`` times (fixed seed). ECE is biased upwards on small sets, so an ECE is only evidence
    of miscalibration when it is above this reference (``p95``); on 100 images the reference mean
    is about 0.08, which a target of 0.05 cannot be told apart from."""
    confidence = np.asarray(probabilities, dtype=np.float64).max(axis=1)
    if confidence.size == 0:
        raise ValueError("no probabilities to draw from")
    rng = np.random.default_rng(seed)
    correct = rng.random((draws, confidence.size)) < confidence
    edges = np.linspace(0.0, 1.0, bins + 1)
    totals = np.zeros(draws)
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            gap = np.abs(correct[:, inside].mean(axis=1) - confidence[inside].mean())
            totals += float(inside.mean()) * gap
    return {"mean": float(totals.mean()), "p95": float(np.percentile(totals, 95)),
            "draws": draws}


def _predicted(probabilities: np.ndarray, predicted: np.ndarray | None) -> np.ndarray:
    if predicted is None:
        return np.asarray(probabilities).argmax(axis=1)
    out = np.asarray(predicted, dtype=np.int64)
    if out.shape != (len(probabilities),):
        raise ValueError(f"predicted has shape {out.shape}, expected ({len(probabilities)},)")
    return out


def evaluation_metrics(
    probabilities: np.ndarray, targets: np.ndarray, labels: Sequence[str],
    predicted: np.ndarray | None = None,
) -> dict[str, Any]:
    """The metrics `breastcad evaluate --json` prints, from class probabilities and targets.

    Binary (two labels): precision, recall, F1, specificity and Jaccard (IoU) of the positive
    class, which is the second label (``idc``); AUC of its probability. Multi-class: macro
    precision, recall, F1 and Jaccard, macro one-vs-rest AUC, and ``auc_abnormal`` (normal vs the
    rest, from 1 - p(normal)) when ``normal`` is a label. ``per_class`` holds each label's
    precision, recall, F1, support and one-vs-rest AUC; ``confusion_matrix`` rows are the true
    label, columns the prediction, both in ``labels`` order. ``predicted``: as in
    :func:`classification_metrics`.
    """
    from sklearn.metrics import jaccard_score, precision_recall_fscore_support

    probabilities = np.asarray(probabilities, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    predicted = _predicted(probabilities, predicted)
    indices = list(range(len(labels)))
    binary = len(labels) == 2
    average = "binary" if binary else "macro"
    precision, recall, f1, _ = precision_recall_fscore_support(
        targets, predicted, labels=indices if not binary else None, pos_label=1,
        average=average, zero_division=0,
    )
    p_c, r_c, f_c, support = precision_recall_fscore_support(
        targets, predicted, labels=indices, average=None, zero_division=0
    )
    base = classification_metrics(probabilities, targets, labels, predicted)
    per_class = {
        label: {
            "precision": float(p_c[i]),
            "recall": float(r_c[i]),
            "f1": float(f_c[i]),
            "support": int(support[i]),
            "auc_ovr": base["auc_per_class_ovr"][label],
        }
        for i, label in enumerate(labels)
    }
    result: dict[str, Any] = {
        "n": int(len(targets)),
        "labels": list(labels),
        "accuracy": base["accuracy"],
        "balanced_accuracy": base["balanced_accuracy"],
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "jaccard": float(
            jaccard_score(targets, predicted, labels=indices if not binary else None,
                          pos_label=1, average=average, zero_division=0)
        ),
        "auc": base["auc_per_class_ovr"][labels[1]] if binary else base["macro_auc_ovr"],
        "ece": expected_calibration_error(probabilities, targets),
        "ece_calibrated_reference": (
            calibrated_ece_reference(probabilities) if len(targets) else None
        ),
        "nll": base["nll"],
        "per_class": per_class,
        "confusion_matrix": base["confusion_matrix"],
    }
    if binary:
        negatives = targets == 0
        result["specificity"] = (
            float((predicted[negatives] == 0).mean()) if negatives.any() else None
        )
    else:
        result["auc_abnormal"] = base.get("auc_normal_vs_abnormal")
    return result
