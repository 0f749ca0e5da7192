"""Result objects built from the real DICOM samples pass dciodvfy and dsrdump."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset
from support.dcmtk import dciodvfy, dsrdump, require_tool

from inference.prediction import Prediction
from reports import build_results

# Warnings our objects may carry, each for a known reason:
# - 99BCAD: dciodvfy knows no private coding scheme, even one declared in the
#   CodingSchemeIdentificationSequence (PS3.16 reserves "99" designators for private schemes);
# - an empty Laterality: the sample does not say which breast, and an absent one is an Error;
# - a single-component PatientName: copied verbatim from the source.
ALLOWED_WARNINGS = (
    re.compile(r"Unrecognized defined term <99BCAD> .*<Coding Scheme Designator>"),
    re.compile(r"is only permitted to be empty when actually unknown.*<Laterality>"),
    re.compile(r"Patient's Name .* Retired Person Name form"),
)

SAMPLES = [
    # (file, label set, label, expected SC Laterality)
    ("US/US1_UNCR.dcm", ("normal", "benign", "malignant"), "malignant", ""),
    ("US/examples_palette.dcm", ("normal", "benign", "malignant"), "benign", ""),
    ("US/deid_GREYSCALE_IMAGE.dcm", ("normal", "benign", "malignant"), "normal", ""),
    ("US/OBXXXX1A_rle_2frame.dcm", ("normal", "benign", "malignant"), "benign", ""),
    ("MG/MG_Explicit_Little_dclunie_testpattern.dcm", ("normal", "benign", "malignant"),
     "malignant", "R"),
    ("MG/cbis-ddsm_P_00173_LEFT_CC_benign.dcm", ("normal", "benign", "malignant"), "benign",
     "L"),
    ("SM/sm_image.dcm", ("non_idc", "idc"), "idc", None),
]


def _unexpected(warnings: list[str]) -> list[str]:
    return [w for w in warnings if not any(p.search(w) for p in ALLOWED_WARNINGS)]


@pytest.mark.parametrize(("relative", "labels", "label", "laterality"), SAMPLES,
                         ids=[s[0] for s in SAMPLES])
def test_results_pass_dciodvfy_and_dsrdump(
    relative: str,
    labels: tuple[str, ...],
    label: str,
    laterality: str | None,
    read_sample: Callable[[str], Dataset],
    display_image: Callable[[Dataset], np.ndarray],
    make_prediction: Callable[..., Prediction],
    tmp_path: Path,
) -> None:
    require_tool("dciodvfy")
    require_tool("dsrdump")
    source = read_sample(relative)
    image = display_image(source)
    if source.Modality == "SM":
        image = np.full((60, 80, 3), 220, dtype=np.uint8)  # a slide thumbnail
    rows, columns = image.shape[:2]
    prediction = make_prediction(rows, columns, label=label, labels=labels,
                                 modality=str(source.Modality))
    priority = label in ("malignant", "idc")
    results = build_results([source], [image], [prediction], series_prediction=prediction,
                            software_version="0.1.0-test", priority=priority)

    sr_path = tmp_path / "sr.dcm"
    sc_path = tmp_path / "sc.dcm"
    results.sr.save_as(sr_path, enforce_file_format=True)
    assert len(results.heatmaps) == 1
    results.heatmaps[0].save_as(sc_path, enforce_file_format=True)

    for path in (sr_path, sc_path):
        verdict = dciodvfy(path)
        assert verdict.errors == [], f"{path.name}:\n{verdict.output}"
        assert _unexpected(verdict.warnings) == [], f"{path.name}:\n{verdict.output}"

    rendered = dsrdump(sr_path)
    assert rendered.returncode == 0, rendered.stderr
    problems = [line for line in (rendered.stdout + rendered.stderr).splitlines()
                if line.startswith(("E:", "F:", "Error"))]
    assert problems == []
    assert "Imaging Measurement Report" in rendered.stdout
    assert f"Probability of class {label}" in rendered.stdout
    # the triage finding
    assert ("High priority" if priority else "Normal priority") in rendered.stdout

    sc = results.heatmaps[0]
    if laterality is None:
        assert "Laterality" not in sc
    else:
        assert sc.Laterality == laterality
