"""``breastcad report FILE.dcm`` prints a breastcad SR as text (run as a user runs it), and
dcmtk's dsrdump renders the same SR without errors or warnings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import Dataset
from results_inputs import LABELS, SHA, display_image, prediction, us_source
from support.dcmtk import dsrdump, require_tool

from reports import build_results
from reports.sr import SimilarCase

REPO = Path(__file__).resolve().parents[2]
SIMILAR_STUDY = "1.2.826.0.1.3680043.8.498.88.1"


def _report(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "report", str(path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )


def _sr(tmp_path: Path) -> tuple[Path, Dataset, Dataset]:
    source = us_source()
    probabilities = {"malignant": 0.71, "benign": 0.2, "normal": 0.09}
    first = build_results(
        [source], [display_image(source)], [prediction(probabilities=probabilities)],
        series_prediction=prediction(probabilities=probabilities), software_version="2.0",
    ).sr
    # a second result of the same series from one more image: it supersedes the first
    second_source = us_source(2)
    objects = build_results(
        [source, second_source],
        [display_image(source), display_image(second_source)],
        [prediction(probabilities=probabilities)] * 2,
        series_prediction=prediction(probabilities=probabilities), software_version="2.0",
        priority=True, predecessor=first,
        similar_cases=[SimilarCase(SIMILAR_STUDY, "benign", 0.25)],
    )
    path = tmp_path / "sr.dcm"
    objects.sr.save_as(path, enforce_file_format=True)
    return path, objects.sr, first


def test_report_prints_the_whole_sr(tmp_path: Path) -> None:
    path, sr, first = _sr(tmp_path)
    done = _report(path)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    print(text)
    assert text.startswith("Imaging Measurement Report")
    for expected in (
        "Patient ID: RES-1",
        f"Study: {sr.StudyInstanceUID}",
        "Accession: ACC-RES-1",
        f"Predecessor: Comprehensive 3D SR Storage {first.SOPInstanceUID}",
        # algorithm (TID 4019)
        "Algorithm Name: busi_test",
        "Algorithm Version: 9.9.9",
        f"sha256={SHA}",
        # the finding with its code, site and laterality
        "Finding: Malignant neoplasm of breast (SCT 254837009)",
        "Finding Site: Breast (SCT 76752008)",
        "Laterality: Left (SCT 7771000)",
        # every class probability, with its code's meaning and unit
        "Probability of class malignant: 0.71 [1]",
        "Probability of class benign: 0.2 [1]",
        "Probability of class normal: 0.09 [1]",
        "Priority (attribute): High priority (SCT 394849002)",
        # both images, and the similar case
        f"Ultrasound Image Storage {us_source(2).SOPInstanceUID}",
        f"Study Instance UID: {SIMILAR_STUDY}",
        "Finding of the similar case: Benign neoplasm of breast (SCT 92115009)",
    ):
        assert expected in text, expected
    assert text.count("Similar case") == 1
    assert set(LABELS) <= {line.split("class ")[-1].split(":")[0]
                           for line in text.splitlines() if "Probability of class" in line}


def test_dsrdump_renders_it_without_errors_or_warnings(tmp_path: Path) -> None:
    require_tool("dsrdump")
    path, sr, _first = _sr(tmp_path)
    done = dsrdump(path)
    assert done.returncode == 0, done.stderr
    noise = [line for line in (done.stdout + done.stderr).splitlines()
             if line.startswith(("E:", "W:", "F:"))]
    assert noise == [], noise
    assert "Imaging Measurement Report" in done.stdout
    assert str(sr.SOPInstanceUID) not in done.stderr


@pytest.mark.parametrize("kind", ["not-dicom", "image"])
def test_report_refuses_what_is_not_an_sr(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "input.dcm"
    if kind == "not-dicom":
        path.write_bytes(b"hello, not DICOM")
    else:
        us_source().save_as(path, enforce_file_format=True)
    done = _report(path)
    assert done.returncode == 2
    assert "breastcad report" in done.stderr
    assert ("not a Structured Report" in done.stderr) == (kind == "image")
