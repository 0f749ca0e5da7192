"""A source that omits Type 2 patient/study attributes (as real devices do) still gets results."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from conftest import MakePrediction, MakeSource
from pydicom import Dataset
from support.dcmtk import dciodvfy, require_tool

from reports import build_results

TYPE2 = (
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "ReferringPhysicianName",
    "StudyTime",
    "AccessionNumber",
)


def test_results_from_a_source_without_type2_attributes(
    make_source: MakeSource,
    make_prediction: MakePrediction,
    display_image: Callable[[Dataset], np.ndarray],
    tmp_path: Path,
) -> None:
    source = make_source()
    for keyword in TYPE2:
        delattr(source, keyword)
    image = display_image(source)
    prediction = make_prediction(source.Rows, source.Columns)
    results = build_results(
        [source], [image], [prediction], series_prediction=prediction, software_version="t"
    )
    for ds in [results.sr, *results.heatmaps]:
        for keyword in TYPE2:
            assert keyword in ds and not ds[keyword].value, keyword  # present and empty
        assert ds.PatientID == source.PatientID
    require_tool("dciodvfy")
    for name, ds in (("sr", results.sr), ("sc", results.heatmaps[0])):
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert not dciodvfy(path).errors, (name, dciodvfy(path).errors)
