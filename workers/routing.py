"""Routing rules: which destinations a result goes to, and whether its sources go too."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dicom_node.settings import Route, RouteCondition


@dataclass(frozen=True)
class ResultFacts:
    """What a routing rule can look at."""

    modality: str
    calling_ae: str | None
    label: str
    probabilities: Mapping[str, float]
    not_assessable: bool = False

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ResultFacts:
        """Facts from a JSON object such as ``GET /studies/{uid}`` shows for a result.

        ``modality`` and ``probabilities`` are required; ``label`` defaults to the most probable
        class, ``calling_ae`` to none, ``not_assessable`` to false. ValueError otherwise.
        """
        if not isinstance(data, Mapping):
            raise ValueError("a result must be a JSON object")
        unknown = set(data) - {"modality", "calling_ae", "label", "probabilities",
                               "not_assessable"}
        if unknown:
            raise ValueError(f"unknown result key(s): {sorted(unknown)}")
        modality = data.get("modality")
        if not isinstance(modality, str) or not modality:
            raise ValueError("result needs a 'modality' string")
        raw = data.get("probabilities")
        if not isinstance(raw, Mapping) or not raw:
            raise ValueError("result needs 'probabilities': {label: p, ...}")
        probabilities: dict[str, float] = {}
        for name, value in raw.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"probability of {name!r} is not a number: {value!r}")
            probabilities[str(name)] = float(value)
        label = data.get("label") or max(probabilities, key=lambda n: probabilities[n])
        calling_ae = data.get("calling_ae")
        if calling_ae is not None and not isinstance(calling_ae, str):
            raise ValueError("'calling_ae' must be a string")
        not_assessable = data.get("not_assessable", False)
        if not isinstance(not_assessable, bool):
            raise ValueError("'not_assessable' must be true or false")
        return cls(
            modality=modality,
            calling_ae=calling_ae,
            label=str(label),
            probabilities=probabilities,
            not_assessable=not_assessable,
        )


@dataclass(frozen=True)
class RoutingDecision:
    """Where one result goes: destinations in order, those that also get the sources."""

    destinations: list[str] = field(default_factory=list)
    forward_source: set[str] = field(default_factory=set)
    # indexes (0-based, in configuration order) of the routes that matched
    matched_routes: list[int] = field(default_factory=list)


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


def route(routes: Sequence[Route], facts: ResultFacts) -> RoutingDecision:
    """Every matching route's destinations, each once, in the order they are first named.

    A destination gets the source instances too when any matching route naming it has
    ``forward_source: true``.
    """
    decision = RoutingDecision()
    for index, rule in enumerate(routes):
        if not matches(rule.when, facts):
            continue
        decision.matched_routes.append(index)
        for name in rule.send_to:
            if name not in decision.destinations:
                decision.destinations.append(name)
            if rule.forward_source:
                decision.forward_source.add(name)
    return decision


def select_destinations(routes: Sequence[Route], facts: ResultFacts) -> list[str]:
    """Destinations of every matching route, each once, in the order they are first named."""
    return route(routes, facts).destinations
