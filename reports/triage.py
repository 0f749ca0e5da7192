"""Triage: how suspicious a finding is, and whether it crosses the priority threshold."""

from __future__ import annotations

from collections.abc import Mapping

# Classes whose probability is the probability of malignancy (BUSI "malignant", IDC "idc").
MALIGNANT_LABELS: tuple[str, ...] = ("malignant", "idc")


def suspicion(probabilities: Mapping[str, float]) -> float | None:
    """The probability of malignancy: the summed probability of :data:`MALIGNANT_LABELS`.

    None when the model has no malignant class (nothing to triage on).
    """
    present = [label for label in MALIGNANT_LABELS if label in probabilities]
    if not present:
        return None
    return float(sum(float(probabilities[label]) for label in present))


def is_priority(value: float | None, threshold: float | None) -> bool:
    """Whether a suspicion crosses the threshold (``value >= threshold``); never if either is
    None."""
    if value is None or threshold is None:
        return False
    return value >= threshold
