"""FHIR R4 DiagnosticReports built by reports.fhir validate with fhir.resources' R4B models."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from pydantic import ValidationError

from reports.fhir import ReportFacts, diagnostic_report, searchset


def _facts(**change: Any) -> ReportFacts:
    values: dict[str, Any] = dict(
        result_id=7, study_instance_uid="1.2.826.0.1.3680043.8.498.1", modality="US",
        label="malignant", probabilities={"normal": 0.1, "benign": 0.2, "malignant": 0.7},
        model_name="us_busi", model_version="1.1.0", model_sha256="ab" * 32,
        sr_sop_instance_uid="2.25.12345", issued=datetime(2026, 1, 2, 3, 4, 5),
        sr_url="http://node/results/7/sr.dcm", patient_id="P-1", accession_number="A-1",
        study_date="20260102", laterality="L", suspicion=0.7, priority=True,
        heatmap_urls=["http://node/results/7/heatmap.png?index=1"],
    )
    values.update(change)
    return ReportFacts(**values)


def test_full_report_validates_and_says_what_the_sr_says() -> None:
    report = diagnostic_report(_facts())
    DiagnosticReport.model_validate(report)
    contained = {r["id"]: r for r in report["contained"]}
    assert set(contained) == {"algorithm", "finding", "p-normal", "p-benign", "p-malignant",
                              "priority"}
    assert contained["finding"]["bodySite"]["coding"][0]["code"] == "80248007"  # left breast
    assert contained["finding"]["valueCodeableConcept"]["coding"][0] == {
        "system": "http://snomed.info/sct", "code": "254837009",
        "display": "Malignant neoplasm of breast"}
    assert contained["p-malignant"]["code"]["coding"][0]["system"] == "urn:breastcad:codes"
    assert contained["priority"]["component"][0]["valueQuantity"]["value"] == 0.7
    assert report["issued"] == "2026-01-02T03:04:05+00:00"
    assert report["effectiveDateTime"] == "2026-01-02"
    assert report["basedOn"][0]["identifier"]["value"] == "A-1"


def test_minimal_report_validates() -> None:
    report = diagnostic_report(_facts(
        patient_id=None, accession_number=None, study_date=None, laterality=None,
        suspicion=None, priority=None, heatmap_urls=[], modality="SM", label="idc",
        probabilities={"non_idc": 0.3, "idc": 0.7},
    ))
    DiagnosticReport.model_validate(report)
    assert "subject" not in report and "priority" not in {r["id"] for r in report["contained"]}
    finding = next(r for r in report["contained"] if r["id"] == "finding")
    assert finding["bodySite"]["coding"][0]["code"] == "76752008"  # breast, side unknown
    assert {r["id"] for r in report["contained"]} >= {"p-non-idc", "p-idc"}


def test_searchset_bundle_validates() -> None:
    bundle = searchset([diagnostic_report(_facts()), diagnostic_report(_facts(result_id=8))],
                       "http://node/fhir")
    Bundle.model_validate(bundle)
    assert bundle["total"] == 2
    assert bundle["entry"][1]["fullUrl"] == "http://node/fhir/DiagnosticReport/8"
    Bundle.model_validate(searchset([], "http://node/fhir"))


@pytest.mark.parametrize("break_it", ["missing code", "unknown key", "bad instant",
                                      "bad quantity"])
def test_the_validator_is_not_a_rubber_stamp(break_it: str) -> None:
    """What these tests rely on: the models reject missing, unknown and mistyped elements.

    (They do not check code bindings such as ``status``; those values come from constants.)
    """
    report = diagnostic_report(_facts())
    if break_it == "missing code":
        del report["code"]
    elif break_it == "unknown key":
        report["findings"] = []
    elif break_it == "bad instant":
        report["issued"] = "yesterday"
    else:
        report["contained"][1]["valueQuantity"] = {"value": "high"}
    with pytest.raises(ValidationError):
        DiagnosticReport.model_validate(report)


def test_unknown_label_or_side_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="no coded concept"):
        diagnostic_report(_facts(label="weird"))
    with pytest.raises(ValueError, match="laterality"):
        diagnostic_report(_facts(laterality="B"))


def test_mammography_report_has_one_finding_per_breast() -> None:
    from reports.fhir import BreastFinding

    right = {"normal": 0.2, "benign": 0.1, "malignant": 0.7}
    left = {"normal": 0.8, "benign": 0.1, "malignant": 0.1}
    report = diagnostic_report(_facts(
        modality="MG", laterality=None, probabilities=right,
        breasts=[BreastFinding("R", "malignant", right), BreastFinding("L", "normal", left)],
    ))
    DiagnosticReport.model_validate(report)
    contained = {r["id"]: r for r in report["contained"]}
    assert {"breast-right", "breast-left"} <= set(contained)
    assert {"#breast-right", "#breast-left"} <= {r["reference"] for r in report["result"]}
    for ident, site, finding, probabilities in (
        ("breast-right", "73056007", "254837009", right),
        ("breast-left", "80248007", "111287", left),
    ):
        observation = contained[ident]
        assert observation["bodySite"]["coding"][0]["code"] == site
        assert observation["valueCodeableConcept"]["coding"][0]["code"] == finding
        assert [c["valueQuantity"]["value"] for c in observation["component"]] == \
            list(probabilities.values())
    with pytest.raises(ValueError, match="laterality"):
        diagnostic_report(_facts(breasts=[BreastFinding("B", "normal", left)]))
