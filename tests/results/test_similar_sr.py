"""The SR lists similar cases (study UID, finding, distance) and stays valid for dciodvfy and
dcmtk's dsrdump."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import Dataset
from results_inputs import display_image, prediction, us_source
from support.dcmtk import dciodvfy, dsrdump, require_tool

from reports import build_results
from reports.sr import SimilarCase

OTHER_STUDIES = ("1.2.826.0.1.3680043.8.498.77.1", "1.2.826.0.1.3680043.8.498.77.2")


def _items(ds: Dataset, meaning: str) -> list[Dataset]:
    found = []
    for item in getattr(ds, "ContentSequence", []):
        if item.ConceptNameCodeSequence[0].CodeMeaning == meaning:
            found.append(item)
        found.extend(_items(item, meaning))
    return found


def test_sr_lists_similar_cases_and_passes_dciodvfy_and_dsrdump(tmp_path: Path) -> None:
    require_tool("dciodvfy")
    require_tool("dsrdump")
    source = us_source()
    cases = [
        SimilarCase(OTHER_STUDIES[0], "malignant", 0.0421),
        SimilarCase(OTHER_STUDIES[1], "benign", 0.1337),
    ]
    objects = build_results(
        [source], [display_image(source)], [prediction()],
        series_prediction=prediction(), software_version="1.0", priority=True,
        similar_cases=cases,
    )
    containers = _items(objects.sr, "Similar case")
    assert len(containers) == 2
    first = containers[0].ContentSequence
    assert OTHER_STUDIES[0] == first[0].UID
    assert first[1].ConceptCodeSequence[0].CodeValue == "254837009"  # malignant neoplasm
    assert float(first[2].MeasuredValueSequence[0].NumericValue) == pytest.approx(0.0421)
    assert containers[1].ContentSequence[1].ConceptCodeSequence[0].CodeValue == "92115009"

    path = tmp_path / "sr.dcm"
    objects.sr.save_as(path, enforce_file_format=True)
    verdict = dciodvfy(path)
    assert not verdict.errors, verdict.output
    rendered = dsrdump(path)
    assert rendered.returncode == 0, rendered.stderr
    assert "Similar case" in rendered.stdout
    assert OTHER_STUDIES[1] in rendered.stdout
    assert not [line for line in (rendered.stdout + rendered.stderr).splitlines()
                if line.startswith(("E:", "W:"))], rendered.stdout + rendered.stderr


def test_without_similar_cases_the_sr_has_none(tmp_path: Path) -> None:
    source = us_source()
    objects = build_results(
        [source], [display_image(source)], [prediction()],
        series_prediction=prediction(), software_version="1.0",
    )
    assert _items(objects.sr, "Similar case") == []


def test_a_similar_case_with_an_unknown_label_is_refused() -> None:
    source = us_source()
    with pytest.raises(ValueError, match="no coded concept"):
        build_results(
            [source], [display_image(source)], [prediction()],
            series_prediction=prediction(), software_version="1.0",
            similar_cases=[SimilarCase(OTHER_STUDIES[0], "weird", 0.1)],
        )
