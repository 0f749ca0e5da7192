"""A breastcad SR as readable text (``breastcad report FILE.dcm``).

The header names the document, patient, study, series, device and predecessor documents; the
body is the content tree, one line per content item, indented by depth: relationship, concept
name, and the value (codes as ``meaning (scheme value)``, numbers with their unit, image
references by SOP Instance UID). Walking the tree rather than expecting fixed positions means any
breastcad SR prints whole: one measurement group per finding, the triage finding, similar cases.
"""

from __future__ import annotations

from collections.abc import Iterator

from pydicom import Dataset
from pydicom.uid import UID

_SR_MODALITY = "SR"


class NotAStructuredReport(ValueError):
    """The dataset is not a DICOM Structured Report."""


def _code(item: Dataset) -> str:
    meaning = str(item.get("CodeMeaning", "")).strip()
    value = item.get("CodeValue") or item.get("LongCodeValue") or item.get("URNCodeValue") or ""
    return f"{meaning} ({item.get('CodingSchemeDesignator', '?')} {value})"


def _concept(item: Dataset) -> str:
    names = item.get("ConceptNameCodeSequence")
    if not names:
        return "(unnamed)"
    return str(names[0].get("CodeMeaning", "")).strip() or _code(names[0])


def _sop(reference: Dataset) -> str:
    sop_class = UID(str(reference.get("ReferencedSOPClassUID", "")))
    name = sop_class.name if sop_class.is_valid else str(sop_class)
    return f"{name} {reference.get('ReferencedSOPInstanceUID', '?')}"


def _value(item: Dataset) -> str:
    kind = str(item.get("ValueType", ""))
    if kind == "CODE" and item.get("ConceptCodeSequence"):
        return _code(item.ConceptCodeSequence[0])
    if kind == "NUM" and item.get("MeasuredValueSequence"):
        measured = item.MeasuredValueSequence[0]
        units = measured.get("MeasurementUnitsCodeSequence")
        unit = f" [{units[0].get('CodeValue', '')}]" if units else ""
        return f"{measured.get('NumericValue', '')}{unit}"
    if kind == "TEXT":
        return str(item.get("TextValue", ""))
    if kind == "UIDREF":
        return str(item.get("UID", ""))
    if kind == "PNAME":
        return str(item.get("PersonName", ""))
    if kind == "DATETIME":
        return str(item.get("DateTime", ""))
    if kind == "DATE":
        return str(item.get("Date", ""))
    if kind == "TIME":
        return str(item.get("Time", ""))
    if kind in ("IMAGE", "COMPOSITE", "WAVEFORM") and item.get("ReferencedSOPSequence"):
        return "; ".join(_sop(r) for r in item.ReferencedSOPSequence)
    if kind in ("SCOORD", "SCOORD3D"):
        return f"{item.get('GraphicType', '')} {list(item.get('GraphicData', []))}"
    return ""


def _tree(items: list[Dataset], depth: int) -> Iterator[str]:
    for item in items:
        relation = str(item.get("RelationshipType", "")).lower().replace("_", " ")
        value = _value(item)
        line = f"{'  ' * depth}{relation + ' ' if relation else ''}{_concept(item)}"
        yield f"{line}: {value}" if value else line
        children = item.get("ContentSequence")
        if children:
            yield from _tree(list(children), depth + 1)


def _fields(ds: Dataset, keywords: list[tuple[str, str]]) -> Iterator[str]:
    for label, keyword in keywords:
        value = ds.get(keyword)
        if value not in (None, ""):
            yield f"{label}: {value}"


def sr_text(ds: Dataset) -> str:
    """The whole SR as text; NotAStructuredReport for anything else."""
    if str(ds.get("Modality", "")) != _SR_MODALITY or "ContentSequence" not in ds:
        raise NotAStructuredReport(
            f"not a Structured Report (Modality {ds.get('Modality', 'missing')!s}, "
            f"{'no ' if 'ContentSequence' not in ds else ''}content tree)"
        )
    lines = [f"{_concept(ds)}  [{UID(str(ds.get('SOPClassUID', ''))).name}]"]
    lines += _fields(ds, [
        ("Patient", "PatientName"),
        ("Patient ID", "PatientID"),
        ("Birth date", "PatientBirthDate"),
        ("Sex", "PatientSex"),
        ("Study", "StudyInstanceUID"),
        ("Accession", "AccessionNumber"),
        ("Study date", "StudyDate"),
        ("Study description", "StudyDescription"),
        ("Series", "SeriesInstanceUID"),
        ("Series description", "SeriesDescription"),
        ("SR instance", "SOPInstanceUID"),
        ("Content date", "ContentDate"),
        ("Content time", "ContentTime"),
        ("Manufacturer", "Manufacturer"),
        ("Software", "SoftwareVersions"),
        ("Completion", "CompletionFlag"),
        ("Verification", "VerificationFlag"),
    ])
    for study in ds.get("PredecessorDocumentsSequence", []):
        for series in study.get("ReferencedSeriesSequence", []):
            for reference in series.get("ReferencedSOPSequence", []):
                lines.append(f"Predecessor: {_sop(reference)} (study {study.StudyInstanceUID})")
    for study in ds.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.get("ReferencedSeriesSequence", []):
            for reference in series.get("ReferencedSOPSequence", []):
                lines.append(f"Evidence: {_sop(reference)}")
    lines.append("")
    lines.append("Content:")
    lines += _tree(list(ds.ContentSequence), 1)
    return "\n".join(lines) + "\n"
