"""The test-support code checked against the real tools: Orthanc, dcmtk, dciodvfy."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pydicom
import pytest
from support.dcmtk import (
    dciodvfy,
    dsrdump,
    echoscu,
    group_by_transfer_syntax,
    parse_dciodvfy,
    require_tool,
    store_responses,
    storescu,
)
from support.dicom_factory import (
    US_IMAGE_STORAGE,
    busi_as_ultrasound,
    make_us_series,
    write_dataset,
)
from support.orthanc import OrthancServer
from support.ports import free_port
from support.shared_data import busi_png_paths

RLE = "1.2.840.10008.1.2.5"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _us_samples(shared_data: Path) -> list[Path]:
    files = sorted((shared_data / "dicom-samples" / "US").glob("*.dcm"))
    assert len(files) == 5, files
    return files


def _grey_and_colour_pngs(shared_data: Path) -> tuple[Path, Path]:
    grey: Path | None = None
    colour: Path | None = None
    for png in busi_png_paths(shared_data):
        ds = busi_as_ultrasound(png, patient_id="X")
        if ds.PhotometricInterpretation == "RGB":
            colour = colour or png
        else:
            grey = grey or png
        if grey and colour:
            return grey, colour
    raise AssertionError("BUSI has no grey or no colour image")


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))


def test_orthanc_private_config_loads_no_plugins(orthanc: OrthancServer) -> None:
    assert orthanc.system()["DicomAet"] == "ORTHANC"
    assert orthanc.system()["DicomPort"] == orthanc.dicom_port
    assert orthanc.config()["Plugins"] == []
    # /plugins lists "explorer.js" (Orthanc Explorer's hook) besides real plugins.
    assert [p for p in orthanc.get_json("/plugins") if p != "explorer.js"] == []
    assert orthanc.instances() == []


def test_echoscu_against_orthanc(orthanc: OrthancServer) -> None:
    require_tool("echoscu")
    done = echoscu("127.0.0.1", orthanc.dicom_port, called_aet=orthanc.aet)
    assert done.returncode == 0, done.stderr


def test_storescu_all_us_samples_into_orthanc(orthanc: OrthancServer, shared_data: Path) -> None:
    require_tool("storescu")
    files = _us_samples(shared_data)
    groups = group_by_transfer_syntax(files)
    assert {RLE, JPEG_BASELINE, EXPLICIT_LE} <= set(groups)
    headers = {f: pydicom.dcmread(f, stop_before_pixels=True) for f in files}
    expected_uids = {str(h.SOPInstanceUID) for h in headers.values()}
    # Quirk of the samples: examples_palette.dcm (pydicom) was derived from
    # OBXXXX1A_rle_2frame.dcm and kept its SOPInstanceUID (and study/series), under another
    # SOP class. Orthanc (OverwriteInstances false) answers Success for both and keeps the
    # first one received, so five files give four instances.
    assert len(expected_uids) == 4

    done = storescu(files, "127.0.0.1", orthanc.dicom_port, called_aet=orthanc.aet)
    assert done.returncode == 0, done.stderr
    assert store_responses(done) == ["Success"] * len(files), done.stderr

    found = orthanc.wait_for_instances(
        lambda tags: {t["SOPInstanceUID"] for t in tags} >= expected_uids, timeout=20
    )
    assert sorted(t["SOPInstanceUID"] for t in found) == sorted(expected_uids)
    assert sorted(orthanc.find(modality="US")) == sorted(orthanc.instances())

    # Orthanc keeps what it received: transfer syntax and pixel bytes are unchanged.
    by_uid_and_class = {(str(h.SOPInstanceUID), str(h.SOPClassUID)): f for f, h in headers.items()}
    for tags in found:
        stored = pydicom.dcmread(
            pydicom.filebase.DicomBytesIO(orthanc.instance_file(tags["OrthancID"]))
        )
        source = pydicom.dcmread(by_uid_and_class[(tags["SOPInstanceUID"], tags["SOPClassUID"])])
        assert stored.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID
        assert stored.PixelData == source.PixelData


def test_storescu_reports_a_refused_association(shared_data: Path) -> None:
    require_tool("storescu")
    port = free_port()  # nothing listens there
    done = storescu(_us_samples(shared_data)[:1], "127.0.0.1", port, timeout=30)
    assert done.returncode != 0
    assert store_responses(done) == []


def test_parse_dciodvfy_lines() -> None:
    result = parse_dciodvfy(
        "USImage\n"
        "Error - Missing attribute Type 1 Required Element=<Rows> Module=<ImagePixel>\n"
        "Warning - Value is zero for value 1 of attribute <Patient's Size>\n"
    )
    assert result.errors == [
        "Error - Missing attribute Type 1 Required Element=<Rows> Module=<ImagePixel>"
    ]
    assert result.warnings == ["Warning - Value is zero for value 1 of attribute <Patient's Size>"]
    assert not result.ok


def test_dciodvfy_finds_errors_in_broken_files(shared_data: Path, tmp_path: Path) -> None:
    require_tool("dciodvfy")
    png = busi_png_paths(shared_data)[0]

    no_modality = busi_as_ultrasound(png, patient_id="BROKEN-1", laterality="L")
    del no_modality.Modality
    result = dciodvfy(write_dataset(no_modality, tmp_path / "no_modality.dcm"))
    assert any("<Modality>" in line for line in result.errors), result.output

    wrong_rows = busi_as_ultrasound(png, patient_id="BROKEN-2", laterality="L")
    wrong_rows.Rows = wrong_rows.Rows + 44
    result = dciodvfy(write_dataset(wrong_rows, tmp_path / "wrong_rows.dcm"))
    assert any("PixelData has incorrect value length" in line for line in result.errors), (
        result.output
    )


def test_wrapped_busi_images_pass_dciodvfy(shared_data: Path, tmp_path: Path) -> None:
    require_tool("dciodvfy")
    grey, colour = _grey_and_colour_pngs(shared_data)
    for png, photometric in ((grey, "MONOCHROME2"), (colour, "RGB")):
        ds = busi_as_ultrasound(png, patient_id="BUSI-SELFTEST", laterality="L")
        assert ds.SOPClassUID == US_IMAGE_STORAGE
        assert ds.PhotometricInterpretation == photometric
        path = write_dataset(ds, tmp_path / f"{photometric}.dcm")
        result = dciodvfy(path)
        assert result.errors == [], result.output
        assert result.warnings == [], result.output

        reread = pydicom.dcmread(path)
        assert reread.file_meta.TransferSyntaxUID == EXPLICIT_LE
        pixels = reread.pixel_array
        assert pixels.shape == ((256, 256) if photometric == "MONOCHROME2" else (256, 256, 3))
        assert pixels.dtype == np.uint8

    # Unknown side (BUSI does not record it): an empty Laterality is a warning, not an error.
    unknown_side = busi_as_ultrasound(grey, patient_id="BUSI-SELFTEST")
    result = dciodvfy(write_dataset(unknown_side, tmp_path / "unknown_side.dcm"))
    assert result.errors == [], result.output
    assert all("Laterality" in line for line in result.warnings), result.output


def test_monochrome2_refuses_a_colour_image(shared_data: Path) -> None:
    _, colour = _grey_and_colour_pngs(shared_data)
    with pytest.raises(ValueError, match="MONOCHROME2"):
        busi_as_ultrasound(colour, patient_id="X", photometric="MONOCHROME2")


def test_made_series_is_one_series_in_orthanc(
    orthanc: OrthancServer, shared_data: Path, tmp_path: Path
) -> None:
    require_tool("storescu")
    files = make_us_series(busi_png_paths(shared_data)[:3], tmp_path / "series", patient_id="S1")
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert [h.InstanceNumber for h in headers] == [1, 2, 3]
    assert len({h.SeriesInstanceUID for h in headers}) == 1
    assert len({h.AccessionNumber for h in headers}) == 1

    done = storescu(files, "127.0.0.1", orthanc.dicom_port, called_aet=orthanc.aet)
    assert done.returncode == 0, done.stderr
    series_uid = str(headers[0].SeriesInstanceUID)
    orthanc.wait_for_instances(lambda tags: len(tags) == 3, timeout=20)
    assert len(orthanc.find(series_instance_uid=series_uid)) == 3
    assert len(orthanc.find(study_instance_uid=str(headers[0].StudyInstanceUID))) == 3
    assert orthanc.find(modality="SR") == []


def test_dsrdump_renders_a_sample_sr(shared_data: Path) -> None:
    require_tool("dsrdump")
    done = dsrdump(shared_data / "dicom-samples" / "SR" / "highdicom_sr_document_tid1500.dcm")
    assert done.returncode == 0, done.stderr
    assert "Imaging Measurement Report" in done.stdout
