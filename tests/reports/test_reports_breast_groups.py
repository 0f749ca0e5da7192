"""Finding groups (one per breast) and referenced frames in the SR and SC."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from support.dcmtk import dciodvfy, require_tool

from inference.prediction import Prediction
from reports import build_results
from reports.sr import FindingGroup

MG_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
FINDING_SITE = "363698007"
LATERALITY = "272741003"
BREAST = "76752008"
SIDES = {"24028007": "R", "7771000": "L"}
ALLOWED_WARNINGS = (
    re.compile(r"Unrecognized defined term <99BCAD> .*<Coding Scheme Designator>"),
    re.compile(r"is only permitted to be empty when actually unknown.*<Laterality>"),
    # the sample's single-component PatientName, copied verbatim
    re.compile(r"Patient's Name .* Retired Person Name form"),
)


def _mg_source(instance: int, side: str, view: str, rows: int = 64, columns: int = 48) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MG_PRESENTATION
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.7.3.{instance}"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.7.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.7.2"
    ds.Modality = "MG"
    ds.PatientName = "Müller^Anna"
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientID = "MG-1"
    ds.StudyID = "S1"
    ds.StudyDate = "20260101"
    ds.StudyTime = "101010"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance
    ds.ImageLaterality = side
    ds.ViewPosition = view
    ds.Rows, ds.Columns = rows, columns
    return ds


def _items(items: Any) -> Iterator[Dataset]:
    for item in items:
        yield item
        if "ContentSequence" in item:
            yield from _items(item.ContentSequence)


def _groups(sr: Dataset) -> list[Dataset]:
    return [item for item in _items(sr.ContentSequence)
            if item.get("ValueType") == "CONTAINER"
            and item.ConceptNameCodeSequence[0].CodeValue == "125007"]


def _check_dicom(ds: Dataset, path: Path) -> None:
    ds.save_as(path, enforce_file_format=True)
    verdict = dciodvfy(path)
    assert verdict.errors == [], verdict.output
    unexpected = [w for w in verdict.warnings if not any(p.search(w) for p in ALLOWED_WARNINGS)]
    assert unexpected == [], verdict.output


def test_one_group_per_breast_with_its_laterality_and_images(
    make_prediction: Callable[..., Prediction], tmp_path: Path
) -> None:
    require_tool("dciodvfy")
    sources = [_mg_source(1, "R", "CC"), _mg_source(2, "R", "MLO"), _mg_source(3, "L", "CC"),
               _mg_source(4, "L", "MLO")]
    images = [np.full((64, 48, 3), 40 * i, np.uint8) for i in range(1, 5)]
    probs = [
        {"normal": 0.1, "benign": 0.2, "malignant": 0.7},
        {"normal": 0.3, "benign": 0.2, "malignant": 0.5},
        {"normal": 0.8, "benign": 0.1, "malignant": 0.1},
        {"normal": 0.6, "benign": 0.3, "malignant": 0.1},
    ]
    predictions = [make_prediction(64, 48, label=max(p, key=lambda k: p[k]), probabilities=p,
                                   modality="MG") for p in probs]
    right = make_prediction(64, 48, label="malignant", modality="MG",
                            probabilities={"normal": 0.2, "benign": 0.2, "malignant": 0.6})
    left = make_prediction(64, 48, label="normal", modality="MG",
                           probabilities={"normal": 0.7, "benign": 0.2, "malignant": 0.1})
    groups = [FindingGroup(prediction=right, source_indices=(0, 1), laterality="R"),
              FindingGroup(prediction=left, source_indices=(2, 3), laterality="L")]
    results = build_results(sources, images, predictions, series_prediction=right,
                            software_version="test", priority=True, groups=groups)
    sr = results.sr
    found = _groups(sr)
    assert len(found) == 2
    for group, expected_side, sops, finding in zip(
        found, ("R", "L"), ((1, 2), (3, 4)), ("254837009", "111287"), strict=True
    ):
        items = list(_items(group.ContentSequence))
        [site] = [i for i in items if i.ConceptNameCodeSequence[0].CodeValue == FINDING_SITE]
        assert site.ConceptCodeSequence[0].CodeValue == BREAST
        [side] = [i for i in site.ContentSequence
                  if i.ConceptNameCodeSequence[0].CodeValue == LATERALITY]
        assert SIDES[side.ConceptCodeSequence[0].CodeValue] == expected_side
        referenced = {str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                      for i in items if i.get("ValueType") == "IMAGE"}
        assert referenced == {f"1.2.826.0.1.3680043.8.498.7.3.{n}" for n in sops}
        findings = [i.ConceptCodeSequence[0].CodeValue for i in items
                    if i.get("ValueType") == "CODE"
                    and i.ConceptNameCodeSequence[0].CodeValue == "121071"]
        assert findings == [finding]
    assert str(sr.PatientName) == "Müller^Anna"
    _check_dicom(sr, tmp_path / "sr.dcm")
    for index, sc in enumerate(results.heatmaps):
        _check_dicom(sc, tmp_path / f"sc-{index}.dcm")

    # same inputs, same UIDs (tracking UIDs of the groups included)
    again = build_results(sources, images, predictions, series_prediction=right,
                          software_version="test", priority=True, groups=groups)
    assert again.sr.SOPInstanceUID == sr.SOPInstanceUID

    def uidrefs(ds: Dataset) -> list[str]:
        return [str(i.UID) for i in _items(ds.ContentSequence) if i.get("ValueType") == "UIDREF"]

    assert uidrefs(again.sr) == uidrefs(sr)
    assert len(set(uidrefs(sr))) == len(uidrefs(sr)) >= 2  # one tracking UID per group


def test_referenced_frame_in_sr_and_sc(
    read_sample: Callable[[str], Dataset],
    make_prediction: Callable[..., Prediction],
    tmp_path: Path,
) -> None:
    require_tool("dciodvfy")
    source = read_sample("US/examples_ybr_color_multiframe.dcm")
    image = np.zeros((240, 320, 3), np.uint8)
    prediction = make_prediction(240, 320)
    results = build_results([source], [image], [prediction], series_prediction=prediction,
                            software_version="test", frame_numbers=[12])
    images = [i for i in _items(results.sr.ContentSequence) if i.get("ValueType") == "IMAGE"]
    framed = [i.ReferencedSOPSequence[0] for i in images
              if "ReferencedFrameNumber" in i.ReferencedSOPSequence[0]]
    assert framed  # the measurement group's source image names its frame
    assert all(int(ref.ReferencedFrameNumber) == 12 for ref in framed)
    assert results.heatmaps[0].SourceImageSequence[0].ReferencedFrameNumber == 12
    _check_dicom(results.sr, tmp_path / "sr.dcm")
    _check_dicom(results.heatmaps[0], tmp_path / "sc.dcm")


def test_bad_groups_and_frames_are_refused(
    make_source: Callable[..., Dataset], make_prediction: Callable[..., Prediction]
) -> None:
    source = make_source(1)
    image = np.zeros((96, 128, 3), np.uint8)
    prediction = make_prediction(96, 128)
    with pytest.raises(ValueError, match="outside"):
        build_results([source], [image], [prediction], series_prediction=prediction,
                      software_version="t",
                      groups=[FindingGroup(prediction=prediction, source_indices=(1,))])
    with pytest.raises(ValueError, match="frame number 2"):
        build_results([source], [image], [prediction], series_prediction=prediction,
                      software_version="t", frame_numbers=[2])
    with pytest.raises(ValueError, match="laterality"):
        build_results([source], [image], [prediction], series_prediction=prediction,
                      software_version="t",
                      groups=[FindingGroup(prediction=prediction, source_indices=(0,),
                                           laterality="X")])
