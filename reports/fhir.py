"""FHIR R4 DiagnosticReport of one result, as plain JSON-ready dicts (no DB, no network).

The report holds its Observations and the algorithm's Device as contained resources:

- ``Device`` ``#algorithm``: the model's name (``model-name``), version and weights sha256;
- ``Observation`` ``#finding``: code DCM 121071 "Finding", value the coded class (the same codes
  as the SR: SNOMED CT 254837009 / 92115009, DCM 111287, ...), bodySite the breast with its
  side when known (SCT 80248007 left breast, 73056007 right breast, else 76752008 breast);
- one ``Observation`` ``#p-<label>`` per class: code the SR's probability concept, valueQuantity
  in UCUM ``1``;
- a mammography study: one ``Observation`` ``#breast-right`` / ``#breast-left`` (/
  ``#breast-unknown``) per breast, code DCM 121071 "Finding", value the breast's coded class,
  bodySite that breast, one component per class probability; the report's own ``#finding`` is
  the study's (the more suspicious breast), without a side when both were seen;
- ``Observation`` ``#priority`` (when a triage decision was made): code SCT 260870009
  "Priority", value SCT 394849002 "High priority" / 394848005 "Normal priority", with the
  suspicion (probability of malignancy) as a component.

The ImagingStudy is referenced by identifier (``urn:dicom:uid`` / ``urn:oid:<StudyInstanceUID>``),
the subject by the patient identifier, and ``presentedForm`` points to the SR (DICOM) by URL.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydicom.sr.coding import Code

from reports import codes

DICOM_UID_SYSTEM = "urn:dicom:uid"
PRIVATE_SYSTEM = "urn:breastcad:codes"  # the SR's private coding scheme 99BCAD
MODEL_SHA256_SYSTEM = "urn:breastcad:model-sha256"
SYSTEMS: Mapping[str, str] = {
    "SCT": "http://snomed.info/sct",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "UCUM": "http://unitsofmeasure.org",
    "LN": "http://loinc.org",
    codes.PRIVATE_SCHEME_DESIGNATOR: PRIVATE_SYSTEM,
}
FINDING = Code("121071", "DCM", "Finding")
# LOINC 18748-4 "Diagnostic imaging study"
REPORT_CODE = Code("18748-4", "LN", "Diagnostic imaging study")
BREAST_SITES: Mapping[str | None, Code] = {
    "L": Code("80248007", "SCT", "Left breast structure"),
    "R": Code("73056007", "SCT", "Right breast structure"),
    None: Code("76752008", "SCT", "Breast structure"),
}
_RADIOLOGY = {
    "coding": [
        {
            "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
            "code": "RAD",
            "display": "Radiology",
        }
    ]
}


@dataclass(frozen=True)
class BreastFinding:
    """One breast's finding of a mammography study (the SR's breast group)."""

    laterality: str | None  # "L", "R" or None (side unknown)
    label: str
    probabilities: Mapping[str, float]


@dataclass(frozen=True)
class ReportFacts:
    """What a DiagnosticReport says about one result (read from the state DB by the caller)."""

    result_id: int
    study_instance_uid: str
    modality: str
    label: str
    probabilities: Mapping[str, float]
    model_name: str
    model_version: str
    model_sha256: str
    sr_sop_instance_uid: str
    issued: datetime
    sr_url: str
    patient_id: str | None = None
    accession_number: str | None = None
    study_date: str | None = None  # DICOM DA, YYYYMMDD
    laterality: str | None = None  # "L", "R" or None
    suspicion: float | None = None
    priority: bool | None = None
    heatmap_urls: Sequence[str] = field(default_factory=tuple)
    breasts: Sequence[BreastFinding] = field(default_factory=tuple)


def _concept(code: Code) -> dict[str, Any]:
    system = SYSTEMS.get(code.scheme_designator)
    if system is None:
        raise ValueError(f"no FHIR system for coding scheme {code.scheme_designator!r}")
    return {
        "coding": [{"system": system, "code": code.value, "display": code.meaning}],
        "text": code.meaning,
    }


def _instant(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)  # the state DB keeps naive UTC
    return value.isoformat(timespec="seconds")


def _date(value: str | None) -> str | None:
    if value is None or len(value) != 8 or not value.isdigit():
        return None
    return f"{value[:4]}-{value[4:6]}-{value[6:]}"


def _probability(value: float) -> dict[str, Any]:
    return {"value": round(float(value), 6), "unit": "1", "system": SYSTEMS["UCUM"], "code": "1"}


def diagnostic_report(facts: ReportFacts) -> dict[str, Any]:
    """The DiagnosticReport of one result (FHIR R4 JSON). ValueError for a label without codes."""
    concepts = codes.class_concepts(facts.label)
    for label in facts.probabilities:
        codes.class_concepts(label)
    if facts.laterality not in BREAST_SITES:
        raise ValueError(f"laterality must be 'L', 'R' or None, not {facts.laterality!r}")
    subject: dict[str, Any] | None = (
        {"identifier": {"value": facts.patient_id}, "type": "Patient"}
        if facts.patient_id
        else None
    )
    study_ref = {
        "type": "ImagingStudy",
        "identifier": {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{facts.study_instance_uid}"},
    }
    effective = _date(facts.study_date)

    def observation(ident: str, code: Code, **values: Any) -> dict[str, Any]:
        resource: dict[str, Any] = {
            "resourceType": "Observation",
            "id": ident,
            "status": "final",
            "category": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                            "code": "imaging",
                        }
                    ]
                }
            ],
            "code": _concept(code),
            "device": {"reference": "#algorithm"},
            "derivedFrom": [study_ref],
            **values,
        }
        if subject is not None:
            resource["subject"] = subject
        if effective is not None:
            resource["effectiveDateTime"] = effective
        return resource

    device = {
        "resourceType": "Device",
        "id": "algorithm",
        "identifier": [{"system": MODEL_SHA256_SYSTEM, "value": facts.model_sha256}],
        "manufacturer": "breastcad",
        "deviceName": [{"name": facts.model_name, "type": "model-name"}],
        "version": [{"value": facts.model_version}],
    }
    observations = [
        observation(
            "finding",
            FINDING,
            valueCodeableConcept=_concept(concepts.finding),
            bodySite=_concept(BREAST_SITES[facts.laterality]),
        )
    ]
    for breast in facts.breasts:
        if breast.laterality not in BREAST_SITES:
            raise ValueError(f"a breast's laterality must be 'L', 'R' or None, not "
                             f"{breast.laterality!r}")
        side = {"L": "left", "R": "right"}.get(breast.laterality or "", "unknown")
        observations.append(
            observation(
                f"breast-{side}",
                FINDING,
                valueCodeableConcept=_concept(codes.class_concepts(breast.label).finding),
                bodySite=_concept(BREAST_SITES[breast.laterality]),
                component=[
                    {
                        "code": _concept(codes.class_concepts(label).probability),
                        "valueQuantity": _probability(value),
                    }
                    for label, value in breast.probabilities.items()
                ],
            )
        )
    for label, value in facts.probabilities.items():
        observations.append(
            observation(
                f"p-{label.replace('_', '-')}",
                codes.class_concepts(label).probability,
                valueQuantity={
                    "value": round(float(value), 6),
                    "unit": "1",
                    "system": SYSTEMS["UCUM"],
                    "code": "1",
                },
            )
        )
    if facts.priority is not None:
        priority = observation(
            "priority",
            codes.PRIORITY,
            valueCodeableConcept=_concept(
                codes.HIGH_PRIORITY if facts.priority else codes.NORMAL_PRIORITY
            ),
        )
        if facts.suspicion is not None:
            priority["component"] = [
                {
                    "code": {"text": "Suspicion (probability of malignancy)"},
                    "valueQuantity": {
                        "value": round(float(facts.suspicion), 6),
                        "unit": "1",
                        "system": SYSTEMS["UCUM"],
                        "code": "1",
                    },
                }
            ]
        observations.append(priority)

    probability = facts.probabilities.get(facts.label)
    conclusion = f"AI finding: {concepts.finding.meaning}"
    if probability is not None:
        conclusion += f" (probability {float(probability):.2f})"
    if facts.priority:
        conclusion += "; priority"
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": str(facts.result_id),
        "contained": [device, *observations],
        "identifier": [
            {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{facts.sr_sop_instance_uid}"}
        ],
        "status": "final",
        "category": [_RADIOLOGY],
        "code": {
            **_concept(REPORT_CODE),
            "text": f"breastcad AI analysis ({facts.modality})",
        },
        "issued": _instant(facts.issued),
        "imagingStudy": [study_ref],
        "result": [{"reference": f"#{o['id']}"} for o in observations],
        "conclusion": conclusion,
        "conclusionCode": [_concept(concepts.finding)],
        "presentedForm": [
            {
                "contentType": "application/dicom",
                "url": facts.sr_url,
                "title": "breastcad AI findings (DICOM Comprehensive 3D SR)",
            },
            *(
                {"contentType": "image/png", "url": url, "title": f"Heatmap {index}"}
                for index, url in enumerate(facts.heatmap_urls, start=1)
            ),
        ],
    }
    if subject is not None:
        report["subject"] = subject
    if effective is not None:
        report["effectiveDateTime"] = effective
    if facts.accession_number:
        # the order the study fulfils, by its accession number (identifier type ACSN)
        report["basedOn"] = [
            {
                "type": "ServiceRequest",
                "identifier": {
                    "type": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                "code": "ACSN",
                            }
                        ]
                    },
                    "value": facts.accession_number,
                },
            }
        ]
    return report


def searchset(reports: Sequence[dict[str, Any]], base_url: str) -> dict[str, Any]:
    """A FHIR searchset Bundle of DiagnosticReports (``base_url`` = the FHIR base, no slash)."""
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(reports),
        "entry": [
            {
                "fullUrl": f"{base_url}/DiagnosticReport/{report['id']}",
                "resource": report,
                "search": {"mode": "match"},
            }
            for report in reports
        ],
    }
