"""Routing rules pick destinations from a result's facts."""

from __future__ import annotations

from dicom_node.settings import Route, RouteCondition
from workers.routing import ResultFacts, select_destinations

FACTS = ResultFacts(
    modality="US",
    calling_ae="US_ROOM_1",
    label="malignant",
    probabilities={"normal": 0.1, "benign": 0.2, "malignant": 0.7},
)


def test_route_without_condition_matches_everything() -> None:
    assert select_destinations([Route(send_to=["archive"])], FACTS) == ["archive"]


def test_conditions_must_all_hold_and_destinations_are_unique() -> None:
    routes = [
        Route(
            when=RouteCondition(modality=["US"], probability_at_least={"malignant": 0.6}),
            send_to=["reading", "archive"],
        ),
        Route(when=RouteCondition(label=["benign"]), send_to=["benign-list"]),
        Route(when=RouteCondition(calling_ae=["US_ROOM_1"]), send_to=["archive"]),
        Route(
            when=RouteCondition(modality=["US"], probability_at_least={"malignant": 0.9}),
            send_to=["urgent"],
        ),
        Route(when=RouteCondition(not_assessable=True), send_to=["qa"]),
    ]
    assert select_destinations(routes, FACTS) == ["reading", "archive"]


def test_single_value_is_accepted_for_a_list_condition() -> None:
    condition = RouteCondition.model_validate({"modality": "MG"})
    assert condition.modality == ["MG"]
    assert select_destinations([Route(when=condition, send_to=["x"])], FACTS) == []
