"""The triage finding (priority) and the Predecessor Documents Sequence of a superseding SR."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset
from support.dcmtk import dciodvfy, dsrdump, require_tool

from inference.prediction import Prediction
from reports import ResultObjects, build_results
from reports.triage import is_priority, suspicion

PRIORITY = "260870009"  # SCT Priority (attribute)
HIGH = "394849002"
NORMAL = "394848005"

ALLOWED_WARNINGS = (
    re.compile(r"Unrecognized defined term <99BCAD> .*<Coding Scheme Designator>"),
    re.compile(r"is only permitted to be empty when actually unknown.*<Laterality>"),
    re.compile(r"Patient's Name .* Retired Person Name form"),
)


def _build(sources: list[Dataset], make_prediction: Callable[..., Prediction],
           **kwargs: object) -> ResultObjects:
    images = [np.zeros((s.Rows, s.Columns, 3), dtype=np.uint8) for s in sources]
    predictions = [make_prediction(s.Rows, s.Columns) for s in sources]
    return build_results(sources, images, predictions, series_prediction=predictions[0],
                         software_version="0.1.0", **kwargs)  # type: ignore[arg-type]


def _evaluations(ds: Dataset) -> dict[str, str]:
    found: dict[str, str] = {}

    def walk(items: object) -> None:
        for item in items:  # type: ignore[attr-defined]
            if item.get("ValueType") == "CODE":
                found[str(item.ConceptNameCodeSequence[0].CodeValue)] = str(
                    item.ConceptCodeSequence[0].CodeValue
                )
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(ds.ContentSequence)
    return found


def test_suspicion_is_the_probability_of_malignancy() -> None:
    assert suspicion({"normal": 0.1, "benign": 0.3, "malignant": 0.6}) == pytest.approx(0.6)
    assert suspicion({"non_idc": 0.2, "idc": 0.8}) == pytest.approx(0.8)
    assert suspicion({"a": 1.0}) is None
    assert is_priority(0.5, 0.5) and not is_priority(0.49, 0.5)
    assert not is_priority(None, 0.5) and not is_priority(0.9, None)


@pytest.mark.parametrize(("priority", "code"), [(True, HIGH), (False, NORMAL), (None, None)])
def test_priority_is_a_triage_finding(make_source: Callable[..., Dataset],
                                      make_prediction: Callable[..., Prediction],
                                      priority: bool | None, code: str | None) -> None:
    results = _build([make_source(1)], make_prediction, priority=priority)
    assert _evaluations(results.sr).get(PRIORITY) == code


def test_a_superseding_sr_references_its_predecessor(
    make_source: Callable[..., Dataset], make_prediction: Callable[..., Prediction]
) -> None:
    first = _build([make_source(1)], make_prediction, priority=False)
    assert "PredecessorDocumentsSequence" not in first.sr
    second = _build([make_source(1), make_source(2)], make_prediction, priority=True,
                    predecessor=first.sr)
    assert second.sr.SOPInstanceUID != first.sr.SOPInstanceUID
    [study] = second.sr.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == first.sr.StudyInstanceUID
    [series] = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first.sr.SeriesInstanceUID
    [instance] = series.ReferencedSOPSequence
    assert instance.ReferencedSOPInstanceUID == first.sr.SOPInstanceUID
    assert instance.ReferencedSOPClassUID == first.sr.SOPClassUID


def test_predecessor_must_be_another_sr_of_the_study(
    make_source: Callable[..., Dataset], make_prediction: Callable[..., Prediction]
) -> None:
    first = _build([make_source(1)], make_prediction)
    with pytest.raises(ValueError, match="the SR being built"):
        _build([make_source(1)], make_prediction, predecessor=first.sr)
    other = _build([make_source(1, study_uid="1.2.3.4", series_uid="1.2.3.4.5")],
                   make_prediction)
    with pytest.raises(ValueError, match="another study"):
        _build([make_source(1), make_source(2)], make_prediction, predecessor=other.sr)
    with pytest.raises(ValueError, match="lacks"):
        _build([make_source(1), make_source(2)], make_prediction, predecessor=Dataset())
    with pytest.raises(ValueError, match="priority"):
        _build([make_source(1)], make_prediction, priority="yes")


def test_superseding_sr_with_triage_passes_dciodvfy_and_dsrdump(
    read_sample: Callable[[str], Dataset],
    display_image: Callable[[Dataset], np.ndarray],
    make_prediction: Callable[..., Prediction],
    tmp_path: Path,
) -> None:
    require_tool("dciodvfy")
    require_tool("dsrdump")
    source = read_sample("US/US1_UNCR.dcm")
    late = read_sample("US/US1_UNCR.dcm")
    late.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.77.1"
    late.InstanceNumber = 2
    image = display_image(source)
    rows, columns = image.shape[:2]
    prediction = make_prediction(rows, columns, label="malignant")
    first = build_results([source], [image], [prediction], series_prediction=prediction,
                          software_version="0.1.0-test", priority=True)
    second = build_results([source, late], [image, image], [prediction, prediction],
                           series_prediction=prediction, software_version="0.1.0-test",
                           priority=True, predecessor=first.sr)
    objects = {"sr.dcm": second.sr, "sc-1.dcm": second.heatmaps[0], "sc-2.dcm": second.heatmaps[1]}
    for name, ds in objects.items():
        path = tmp_path / name
        ds.save_as(path, enforce_file_format=True)
        verdict = dciodvfy(path)
        assert verdict.errors == [], f"{name}:\n{verdict.output}"
        unexpected = [w for w in verdict.warnings
                      if not any(p.search(w) for p in ALLOWED_WARNINGS)]
        assert unexpected == [], f"{name}:\n{verdict.output}"
    rendered = dsrdump(tmp_path / "sr.dcm")
    assert rendered.returncode == 0, rendered.stderr
    problems = [line for line in (rendered.stdout + rendered.stderr).splitlines()
                if line.startswith(("E:", "F:", "Error"))]
    assert problems == []
    assert "High priority" in rendered.stdout
    assert "Priority" in rendered.stdout
    # the new objects do not reuse any UID of the superseded ones
    old = {str(first.sr.SOPInstanceUID), str(first.heatmaps[0].SOPInstanceUID)}
    assert old.isdisjoint({str(ds.SOPInstanceUID) for ds in objects.values()})
