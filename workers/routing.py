"""Routing rules: which destinations a result goes to."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dicom_node.settings import Route, RouteCondition


@dataclass(frozen=True)
class ResultFacts:
    """What a routing rule can look at."""

    modality: str
    calling_ae: str | None
    label: str
    probabilities: Mapping[str, float]
    not_assessable: bool = False


def matches(condition: RouteCondition | None, facts: ResultFacts) -> bool:
    if condition is None:
        return True
    if condition.modality is not None and facts.modality not in condition.modality:
        return False
    if condition.calling_ae is not None and (facts.calling_ae or "") not in condition.calling_ae:
        return False
    if condition.label is not None and facts.label not in condition.label:
        return False
    if condition.probability_at_least is not None:
        for label, threshold in condition.probability_at_least.items():
            if facts.probabilities.get(label, 0.0) < threshold:
                return False
    return not (
        condition.not_assessable is not None and facts.not_assessable != condition.not_assessable
    )


def select_destinations(routes: Sequence[Route], facts: ResultFacts) -> list[str]:
    """Destinations of every matching route, each once, in the order they are first named."""
    chosen: list[str] = []
    for route in routes:
        if matches(route.when, facts):
            for name in route.send_to:
                if name not in chosen:
                    chosen.append(name)
    return chosen
