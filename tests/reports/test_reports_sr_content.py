"""What the TID 1500 SR says: the coded finding, every class probability, the references."""

from __future__ import annotations

import io
from collections.abc import Callable

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.sr.codedict import codes

from inference.prediction import Prediction
from reports import build_results

FINDINGS = {
    "malignant": ("254837009", "SCT"),
    "benign": ("92115009", "SCT"),
    "normal": ("111287", "DCM"),
    "idc": ("408643008", "SCT"),
    "non_idc": ("NONIDC", "99BCAD"),
}


def _reread(ds: Dataset) -> hd.sr.Comprehensive3DSR:
    """The SR as a PACS would get it: written to bytes, read back, parsed by highdicom."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(buffer))


def _report(sr: hd.sr.Comprehensive3DSR) -> hd.sr.MeasurementReport:
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    return report


def _group(sr: hd.sr.Comprehensive3DSR) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    groups = _report(sr).get_image_measurement_groups()
    assert len(groups) == 1
    return groups[0]


def _code_value(evaluation: hd.sr.QualitativeEvaluation) -> str:
    # highdicom annotates QualitativeEvaluation.value as a number; it is a CodedConcept.
    value: object = evaluation.value
    assert isinstance(value, hd.sr.CodedConcept)
    return str(value.value)


def _items(dataset: Dataset) -> list[Dataset]:
    """All content items below ``dataset``, depth first."""
    found: list[Dataset] = []
    for item in dataset.get("ContentSequence", []):
        found.append(item)
        found.extend(_items(item))
    return found


def _text(sr: Dataset, code: tuple[str, str]) -> list[str]:
    return [str(i.TextValue) for i in _items(sr)
            if i.ValueType == "TEXT" and (i.ConceptNameCodeSequence[0].CodeValue,
                                          i.ConceptNameCodeSequence[0].CodingSchemeDesignator)
            == code]


def _build(make_source: Callable[..., Dataset], make_prediction: Callable[..., Prediction],
           count: int = 1, source_args: dict[str, object] | None = None,
           **prediction_args: object) -> Dataset:
    sources = [make_source(i + 1, **(source_args or {})) for i in range(count)]
    images = [np.zeros((s.Rows, s.Columns, 3), dtype=np.uint8) for s in sources]
    predictions = [make_prediction(s.Rows, s.Columns, **prediction_args) for s in sources]
    return build_results(sources, images, predictions, series_prediction=predictions[0],
                         software_version="0.1.0").sr


@pytest.mark.parametrize(("labels", "label"), [
    (("normal", "benign", "malignant"), "malignant"),
    (("normal", "benign", "malignant"), "benign"),
    (("normal", "benign", "malignant"), "normal"),
    (("non_idc", "idc"), "idc"),
    (("non_idc", "idc"), "non_idc"),
])
def test_finding_is_the_coded_predicted_class(make_source: Callable[..., Dataset],
                                             make_prediction: Callable[..., Prediction],
                                             labels: tuple[str, ...], label: str) -> None:
    sr = _reread(_build(make_source, make_prediction, labels=labels, label=label))
    finding = _group(sr).finding_type
    assert finding is not None
    assert (finding.value, finding.scheme_designator) == FINDINGS[label]


def test_one_probability_measurement_per_class(make_source: Callable[..., Dataset],
                                              make_prediction: Callable[..., Prediction]) -> None:
    probabilities = {"normal": 0.125, "benign": 0.25, "malignant": 0.625}
    sr = _reread(_build(make_source, make_prediction, probabilities=probabilities))
    measurements = _group(sr).get_measurements()
    values = {m.name.meaning: m.value for m in measurements}
    assert values == {f"Probability of class {k}": v for k, v in probabilities.items()}
    for m in measurements:
        assert m.name.scheme_designator == "99BCAD"
        assert (m.unit.value, m.unit.scheme_designator) == ("1", "UCUM")
    declared = [str(item.CodingSchemeDesignator)
                for item in sr.CodingSchemeIdentificationSequence]
    assert "99BCAD" in declared


def test_ood_score_and_assessability_are_reported(
    make_source: Callable[..., Dataset], make_prediction: Callable[..., Prediction]
) -> None:
    sr = _reread(_build(make_source, make_prediction, ood_score=0.375, not_assessable=True))
    group = _group(sr)
    values = {m.name.value: m.value for m in group.get_measurements()}
    assert values["OODSCORE"] == pytest.approx(0.375)
    evaluations = {q.name.value: _code_value(q) for q in group.get_qualitative_evaluations()}
    assert evaluations == {"ASSESSABLE": "373067005"}  # SCT No

    plain = _group(_reread(_build(make_source, make_prediction)))
    assert "OODSCORE" not in {m.name.value for m in plain.get_measurements()}
    assert {_code_value(q) for q in plain.get_qualitative_evaluations()} == {"373066001"}


def test_source_images_are_referenced(make_source: Callable[..., Dataset],
                                      make_prediction: Callable[..., Prediction]) -> None:
    sr = _reread(_build(make_source, make_prediction, count=2))
    expected = {make_source(1).SOPInstanceUID, make_source(2).SOPInstanceUID}
    referenced = {str(s.referenced_sop_instance_uid) for s in _group(sr).source_images}
    assert referenced == expected
    evidence = {str(uid) for _, _, uid, _ in sr.get_evidence()}
    assert evidence == expected
    library = [i for i in _items(sr) if i.ValueType == "IMAGE"
               and i.ConceptNameCodeSequence[0].CodeMeaning == "Source"]
    assert {str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for i in library} == expected


def test_algorithm_observer_and_procedure(make_source: Callable[..., Dataset],
                                          make_prediction: Callable[..., Prediction]) -> None:
    sr = _reread(_build(make_source, make_prediction, model_name="busi_cnn",
                        model_version="2.1", model_sha256="ab" * 32))
    assert _text(sr, ("111001", "DCM")) == ["busi_cnn"]  # Algorithm Name
    assert _text(sr, ("111003", "DCM")) == ["2.1"]  # Algorithm Version
    assert _text(sr, ("111002", "DCM")) == ["sha256=" + "ab" * 32]  # Algorithm Parameters
    observers = _report(sr).get_observer_contexts()
    assert len(observers) == 1
    device = observers[0].observer_identifying_attributes
    assert isinstance(device, hd.sr.DeviceObserverIdentifyingAttributes)
    assert (device.name, device.manufacturer_name, device.model_name) == (
        "breastcad", "breastcad", "busi_cnn")
    procedures = [i.ConceptCodeSequence[0] for i in _items(sr) if i.ValueType == "CODE"
                  and i.ConceptNameCodeSequence[0].CodeValue == "121058"]
    assert [(p.CodeValue, p.CodingSchemeDesignator) for p in procedures] == [
        ("47079000", "SCT")
    ]


def test_finding_site_is_the_breast_with_its_side(
    make_source: Callable[..., Dataset], make_prediction: Callable[..., Prediction]
) -> None:
    sr = _reread(_build(make_source, make_prediction, source_args={"laterality": "L"}))
    sites = _group(sr).finding_sites
    assert len(sites) == 1
    assert (sites[0].value.value, sites[0].value.scheme_designator) == ("76752008", "SCT")
    assert sites[0].laterality == codes.cid244.Left

    unsided = _group(_reread(_build(make_source, make_prediction))).finding_sites
    assert unsided[0].laterality is None


def test_patient_and_study_come_from_the_source(make_source: Callable[..., Dataset],
                                                make_prediction: Callable[..., Prediction]) -> None:
    sr = _build(make_source, make_prediction)
    source = make_source(1)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID",
                    "AccessionNumber", "StudyDate", "StudyTime", "ReferringPhysicianName",
                    "StudyInstanceUID"):
        assert str(sr[keyword].value) == str(source[keyword].value), keyword
    assert sr.SeriesDescription == "breastcad AI findings"
    assert sr.Manufacturer == "breastcad"
    assert sr.SoftwareVersions == "0.1.0"
    assert sr.Modality == "SR"
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR


def test_the_series_prediction_is_what_the_sr_reports(
    make_source: Callable[..., Dataset], make_prediction: Callable[..., Prediction]
) -> None:
    sources = [make_source(1), make_source(2)]
    images = [np.zeros((s.Rows, s.Columns, 3), dtype=np.uint8) for s in sources]
    per_image = [make_prediction(96, 128, label="benign"), make_prediction(96, 128,
                                                                         label="normal")]
    series = make_prediction(96, 128, label="malignant",
                             probabilities={"normal": 0.2, "benign": 0.3, "malignant": 0.5})
    sr = _reread(build_results(sources, images, per_image, series_prediction=series,
                               software_version="0.1.0").sr)
    group = _group(sr)
    assert group.finding_type is not None and group.finding_type.value == "254837009"
    values = {m.name.value: m.value for m in group.get_measurements()}
    assert values == {"PNORMAL": 0.2, "PBENIGN": 0.3, "PMALIGNANT": 0.5}
