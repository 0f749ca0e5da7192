"""Whole slides end to end: storescu -> breastcad serve -> slide SR + heatmap SC in a real Orthanc.

Two slides assembled from TEST-split patients' real IDC patches (``support.wsi_factory``), one a
JPEG pyramid and one a JPEG 2000 pyramid, and the 50 x 50 pixel JPEG-LS sample slide (smaller
than one analysis tile: its job fails with that reason). Needs the bundled SM patch model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from node_process import Node
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000, JPEGBaseline8Bit
from support.dcmtk import dciodvfy, require_tool, store_responses, storescu
from support.orthanc import OrthancServer
from support.wsi_factory import SlidePatient, split_test_patients, write_patient_slide

from inference import ModelNotAvailableError, load_bundled

pytestmark = pytest.mark.e2e

SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
IDC_FINDING = "408643008"
NON_IDC_FINDING = "NONIDC"


def _numbers(ds: Dataset) -> dict[str, tuple[float, str]]:
    """Concept meaning -> (value, unit code) of every NUM item of an SR."""
    found: dict[str, tuple[float, str]] = {}

    def walk(items: Any) -> None:
        for item in items:
            if item.get("ValueType") == "NUM":
                value = item.MeasuredValueSequence[0]
                found[str(item.ConceptNameCodeSequence[0].CodeMeaning)] = (
                    float(value.NumericValue),
                    str(value.MeasurementUnitsCodeSequence[0].CodeValue),
                )
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(ds.ContentSequence)
    return found


def _finding(ds: Dataset) -> str:
    def walk(items: Any) -> str | None:
        for item in items:
            if item.get("ValueType") == "CODE" and item.ConceptNameCodeSequence[0].CodeValue == \
                    "121071":
                return str(item.ConceptCodeSequence[0].CodeValue)
            if "ContentSequence" in item:
                inner = walk(item.ContentSequence)
                if inner:
                    return inner
        return None

    value = walk(ds.ContentSequence)
    assert value is not None
    return value


def test_slides_end_to_end(
    shared_data: Path, orthanc: OrthancServer, tmp_path: Path
) -> None:
    require_tool("storescu")
    require_tool("dciodvfy")
    try:
        load_bundled("SM")
    except ModelNotAvailableError as exc:
        pytest.skip(f"needs the bundled SM patch model: {exc}")
    idc = shared_data / "idc-breast-histopathology"
    if not (idc / "labels.csv").is_file():
        pytest.skip("IDC patches not available")
    patients = split_test_patients(idc)[:2]
    slides: dict[str, list[Path]] = {}
    for patient, syntax in zip(patients, (JPEGBaseline8Bit, JPEG2000), strict=True):
        info = SlidePatient(patient_name="Ärztin^Zoë", patient_id=f"IDC-{patient}")
        paths, _ = write_patient_slide(idc, patient, tmp_path / patient, transfer_syntax=syntax,
                                       patient=info)
        slides[info.series_instance_uid] = paths
    sample = shared_data / "dicom-samples" / "SM" / "sm_image_jpegls.dcm"
    files = [p for paths in slides.values() for p in paths] + [sample]

    with Node(tmp_path / "node", pacs_port=orthanc.dicom_port) as node:
        try:
            sent = storescu(files, "127.0.0.1", node.dicom_port, called_aet="BREASTCAD")
            assert sent.returncode == 0, sent.stderr
            responses = store_responses(sent)
            assert len(responses) == len(files) and set(responses) == {"Success"}, responses

            jobs = {j["series_instance_uid"]: j for j in node.wait_for_jobs(3, timeout=400)}
            tiny = jobs[str(dcmread(sample, stop_before_pixels=True).SeriesInstanceUID)]
            assert tiny["state"] == "failed"
            assert "smaller than one 200 µm analysis tile" in tiny["reason"]
            for series_uid in slides:
                assert jobs[series_uid]["state"] == "done", jobs[series_uid]

            expected: dict[str, dict[str, Any]] = {}
            for series_uid, paths in slides.items():
                head = dcmread(paths[0], stop_before_pixels=True)
                study = node.client.get(f"/studies/{head.StudyInstanceUID}").json()
                [entry] = [s for s in study["series"] if s["series_instance_uid"] == series_uid]
                result = entry["results"][-1]
                [image] = result["per_image"]
                # the tiles were read from the 4 µm/pixel level (level 1 of a 2 µm pyramid)
                level1 = dcmread(paths[1], stop_before_pixels=True)
                assert image["sop_instance_uid"] == str(level1.SOPInstanceUID)
                expected[result["sr_sop_instance_uid"]] = result

            def arrived(tags: list[dict[str, Any]]) -> bool:
                srs = {t.get("SOPInstanceUID") for t in tags if t.get("Modality") == "SR"}
                scs = [t for t in tags if t.get("SOPClassUID") == SC_STORAGE]
                return set(expected) <= srs and len(scs) >= len(slides)

            tags = orthanc.wait_for_instances(arrived, timeout=120)
        except (AssertionError, TimeoutError):
            print(node.log_tail())
            raise

    outdir = tmp_path / "from-pacs"
    outdir.mkdir()
    checked_sc = 0
    for tag in tags:
        if tag.get("Modality") != "SR" and tag.get("SOPClassUID") != SC_STORAGE:
            continue
        path = outdir / f"{tag['SOPInstanceUID']}.dcm"
        path.write_bytes(orthanc.instance_file(tag["OrthancID"]))
        check = dciodvfy(path)
        assert not check.errors, (path.name, check.errors)
        ds = dcmread(path)
        assert str(ds.PatientName) == "Ärztin^Zoë"
        if ds.Modality == "SR":
            result = expected[str(ds.SOPInstanceUID)]
            numbers = _numbers(ds)
            tissue, unit = numbers["Area of tissue analysed"]
            tumour, _ = numbers["Area of tumour-positive tissue"]
            fraction, percent = numbers["Fraction of tissue tumour-positive"]
            tiles, _ = numbers["Number of tissue tiles analysed"]
            positive, _ = numbers["Number of tumour-positive tiles"]
            assert (unit, percent) == ("mm2", "%")
            assert tissue == pytest.approx(tiles * 0.04, rel=1e-4) and tiles > 20
            assert tumour == pytest.approx(positive * 0.04, rel=1e-4)
            assert fraction == pytest.approx(100 * positive / tiles, rel=1e-3)
            p_idc, _ = numbers["Probability of class idc"]
            assert p_idc == pytest.approx(result["probabilities"]["idc"], abs=1e-6)
            assert _finding(ds) == (IDC_FINDING if result["label"] == "idc" else NON_IDC_FINDING)
        else:
            checked_sc += 1
            assert ds.BurnedInAnnotation == "YES" and ds.SamplesPerPixel == 3
            assert ds.ContainerIdentifier  # a slide's SC keeps its container
            assert max(ds.Rows, ds.Columns) <= 1536
    assert checked_sc == len(slides)
    for result in expected.values():
        assert [d["state"] for d in result["deliveries"]] == ["done"], result["deliveries"]
