"""DICOMweb through a real node: STOW-RS in, analysis, QIDO-RS finds breastcad's SR and SC,
WADO-RS returns them (dciodvfy-clean), results leave by STOW-RS to Orthanc's DICOMweb plugin;
QIDO matching keys; malformed and refused input.

Clients: ``dicomweb-client`` (written by others) for the standard transactions; raw ``httpx``
where a request must be malformed on purpose or the exact bytes matter.
"""

from __future__ import annotations

import io
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from dicomweb_client.api import DICOMwebClient
from node_process import Node
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from support.dcmtk import dciodvfy, require_tool
from support.dicom_factory import make_us_series
from support.orthanc import OrthancServer
from support.shared_data import busi_png_paths

pytestmark = pytest.mark.e2e

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
STOW_TYPE = 'multipart/related; type="application/dicom"; boundary={}'


def _client(node: Node) -> DICOMwebClient:
    return DICOMwebClient(url=f"{node.url}/dicomweb")


def _multipart(parts: Sequence[bytes], boundary: str) -> bytes:
    body = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n"
        for part in parts
    )
    return body + b"--" + boundary.encode() + b"--\r\n"


def _stow_raw(
    node: Node, parts: Sequence[bytes], path: str = "/dicomweb/studies"
) -> httpx.Response:
    boundary = secrets.token_hex(8)
    return node.client.post(
        path,
        content=_multipart(parts, boundary),
        headers={"Content-Type": STOW_TYPE.format(boundary), "Accept": "application/dicom+json"},
    )


def _us_files(shared_data: Path, work: Path, label: str, count: int, **kw: Any) -> list[Path]:
    return make_us_series(busi_png_paths(shared_data, label)[:count], work, **kw)


def _wait_result(node: Node, study_uid: str, timeout: float = 240) -> dict[str, Any]:
    """The first result of the study's first series, once its job is done."""
    deadline = time.monotonic() + timeout
    study: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = node.client.get(f"/studies/{study_uid}")
        if response.status_code == 200:
            study = response.json()
            for series in study["series"]:
                if series["results"]:
                    return dict(series["results"][-1])
                if series["job_state"] == "failed":
                    raise AssertionError(f"analysis failed: {series['jobs']}")
        time.sleep(0.5)
    raise AssertionError(f"no result for study {study_uid} in {timeout} s: {study}")


def _wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _stored_files(node: Node) -> list[Path]:
    return sorted((node.workdir / "var" / "instances").rglob("*.dcm"))


def test_stow_us_instance_is_analysed_and_its_sr_is_found_and_returned(
    dw_node: Node, dicomweb_orthanc: OrthancServer, shared_data: Path, tmp_path: Path
) -> None:
    require_tool("dciodvfy")
    [path] = _us_files(shared_data, tmp_path / "src", "malignant", 1, patient_id="DW-STOW-1")
    source = dcmread(path)
    study, series = str(source.StudyInstanceUID), str(source.SeriesInstanceUID)
    client = _client(dw_node)

    answer = client.store_instances([source])
    assert "FailedSOPSequence" not in answer
    assert [str(i.ReferencedSOPInstanceUID) for i in answer.ReferencedSOPSequence] == [
        str(source.SOPInstanceUID)
    ]
    assert answer.RetrieveURL.endswith(f"/dicomweb/studies/{study}")

    result = _wait_result(dw_node, study)
    assert result["modality"] == "US"

    # QIDO finds the received image, the SR and the SC heatmap, all in the source study
    found = [Dataset.from_json(item) for item in client.search_for_instances(study)]
    by_class: dict[str, list[Dataset]] = {}
    for item in found:
        by_class.setdefault(str(item.SOPClassUID), []).append(item)
    assert [str(i.SOPInstanceUID) for i in by_class[US_IMAGE]] == [str(source.SOPInstanceUID)]
    [sr] = by_class[COMPREHENSIVE_3D_SR]
    assert str(sr.SOPInstanceUID) == result["sr_sop_instance_uid"]
    assert sr.Modality == "SR"
    [sc] = by_class[SECONDARY_CAPTURE]
    only_sr = client.search_for_instances(study, search_filters={"Modality": "SR"})
    assert [Dataset.from_json(i).SOPInstanceUID for i in only_sr] == [sr.SOPInstanceUID]
    series_uids = {Dataset.from_json(s).SeriesInstanceUID for s in client.search_for_series(study)}
    assert {series, sr.SeriesInstanceUID, sc.SeriesInstanceUID} <= series_uids

    # WADO returns the SR as breastcad wrote it, and it is a valid SR
    retrieved = client.retrieve_instance(study, sr.SeriesInstanceUID, sr.SOPInstanceUID)
    assert retrieved.SOPInstanceUID == sr.SOPInstanceUID
    assert retrieved.SOPClassUID == COMPREHENSIVE_3D_SR
    written = dw_node.client.get(result["sr"]).content
    bare = dw_node.client.get(
        f"/dicomweb/studies/{study}/series/{sr.SeriesInstanceUID}/instances/{sr.SOPInstanceUID}",
        headers={"Accept": "application/dicom"},
    )
    assert bare.status_code == 200 and bare.headers["content-type"] == "application/dicom"
    assert bare.content == written
    sr_file = tmp_path / "sr-from-wado.dcm"
    sr_file.write_bytes(bare.content)
    verdict = dciodvfy(sr_file)
    assert verdict.ok, verdict.output

    sc_bare = dw_node.client.get(
        f"/dicomweb/studies/{study}/series/{sc.SeriesInstanceUID}/instances/{sc.SOPInstanceUID}",
        headers={"Accept": "application/dicom"},
    )
    sc_file = tmp_path / "sc-from-wado.dcm"
    sc_file.write_bytes(sc_bare.content)
    verdict = dciodvfy(sc_file)
    assert verdict.ok, verdict.output

    # rendered: the SC heatmap as PNG, the source image as JPEG (the default)
    png = client.retrieve_instance_rendered(
        study, sc.SeriesInstanceUID, sc.SOPInstanceUID, media_types=("image/png",)
    )
    sc_full = client.retrieve_instance(study, sc.SeriesInstanceUID, sc.SOPInstanceUID)
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG"
        assert image.size == (sc_full.Columns, sc_full.Rows)
    jpeg = dw_node.client.get(
        f"/dicomweb/studies/{study}/series/{series}/instances/{source.SOPInstanceUID}/rendered"
    )
    assert jpeg.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(jpeg.content)) as image:
        assert image.format == "JPEG" and image.size == (source.Columns, source.Rows)
    no_pixels = dw_node.client.get(
        f"/dicomweb/studies/{study}/series/{sr.SeriesInstanceUID}/instances/"
        f"{sr.SOPInstanceUID}/rendered"
    )
    assert no_pixels.status_code == 400 and "no pixel data" in no_pixels.json()["detail"]

    # the results reached Orthanc by STOW-RS (its own DICOMweb finds them) ...
    pacs = DICOMwebClient(url=dicomweb_orthanc.dicomweb_url)
    _wait(
        lambda: len(pacs.search_for_instances(search_filters={"StudyInstanceUID": study})) >= 2,
        60,
        "the SR and SC in Orthanc",
    )
    in_pacs = {
        Dataset.from_json(i).SOPInstanceUID
        for i in pacs.search_for_instances(search_filters={"StudyInstanceUID": study})
    }
    assert {sr.SOPInstanceUID, sc.SOPInstanceUID} <= in_pacs
    assert (
        pacs.retrieve_instance(study, sr.SeriesInstanceUID, sr.SOPInstanceUID).SOPInstanceUID
        == sr.SOPInstanceUID
    )

    # ... with delivery rows like C-STORE: done for Orthanc, failed after 2 attempts for "down"
    def deliveries() -> dict[str, dict[str, Any]] | None:
        rows = dw_node.client.get(f"/studies/{study}").json()["series"][0]["results"][-1][
            "deliveries"
        ]
        states = {row["destination"]: row for row in rows}
        if all(row["state"] in ("done", "failed") for row in rows) and len(rows) == 2:
            return states
        return None

    final = _wait(deliveries, 60, "both deliveries to finish")
    assert final["pacs"]["state"] == "done" and final["pacs"]["attempts"] == 1
    assert final["down"]["state"] == "failed" and final["down"]["attempts"] == 2
    assert "STOW-RS" in final["down"]["last_error"]
    log = dw_node.client.get(f"/deliveries/{final['down']['id']}").json()["attempt_log"]
    assert [a["ok"] for a in log] == [False, False]


def test_qido_matching_keys(dw_node: Node, shared_data: Path, tmp_path: Path) -> None:
    client = _client(dw_node)
    tag = secrets.token_hex(3).upper()
    studies: dict[str, Dataset] = {}
    for index, (date, label) in enumerate(
        [("20190301", "benign"), ("20200615", "normal"), ("20211231", "benign")]
    ):
        [path] = make_us_series(
            busi_png_paths(shared_data, label)[index + 3 : index + 4],
            tmp_path / f"s{index}",
            patient_id=f"Q{tag}-{index}",
            accession_number=f"ACC{tag}{index}",
        )
        ds = dcmread(path)
        ds.StudyDate = date
        client.store_instances([ds])
        studies[date] = ds

    def uids(filters: dict[str, Any], **kw: Any) -> set[str]:
        found = client.search_for_studies(search_filters=filters, **kw)
        return {str(Dataset.from_json(item).StudyInstanceUID) for item in found}

    mine = {str(ds.StudyInstanceUID) for ds in studies.values()}
    first, second, third = (str(studies[d].StudyInstanceUID) for d in sorted(studies))
    assert uids({"PatientID": f"Q{tag}-1"}) == {second}
    assert uids({"PatientID": f"Q{tag}-*"}) == mine
    assert uids({"PatientID": f"Q{tag}-?"}) == mine
    assert uids({"AccessionNumber": f"ACC{tag}2"}) == {third}
    assert uids({"StudyInstanceUID": first}) == {first}
    assert uids({"00100020": f"Q{tag}-0"}) == {first}  # a tag instead of the keyword
    assert uids({"PatientID": f"Q{tag}-*", "StudyDate": "20200101-20211231"}) == {second, third}
    assert uids({"PatientID": f"Q{tag}-*", "StudyDate": "-20200615"}) == {first, second}
    assert uids({"PatientID": f"Q{tag}-*", "StudyDate": "20211231"}) == {third}
    assert uids({"PatientID": f"Q{tag}-*", "ModalitiesInStudy": "US"}) == mine
    assert uids({"PatientID": f"Q{tag}-*", "ModalitiesInStudy": "MG"}) == set()
    assert uids({"PatientID": "NOBODY-AT-ALL"}) == set()

    # limit and offset page through the same ordered answer
    everything = client.search_for_studies(search_filters={"PatientID": f"Q{tag}-*"})
    paged = [
        item
        for offset in range(3)
        for item in client.search_for_studies(
            search_filters={"PatientID": f"Q{tag}-*"}, limit=1, offset=offset
        )
    ]
    assert paged == everything and len(everything) == 3

    # series and instance levels
    ds = studies["20200615"]
    [series] = client.search_for_series(search_filters={"PatientID": f"Q{tag}-1", "Modality": "US"})
    series_ds = Dataset.from_json(series)
    assert series_ds.SeriesInstanceUID == ds.SeriesInstanceUID
    assert int(series_ds.NumberOfSeriesRelatedInstances) == 1
    [instance] = client.search_for_instances(
        search_filters={"SOPInstanceUID": str(ds.SOPInstanceUID)}
    )
    assert Dataset.from_json(instance).SeriesInstanceUID == ds.SeriesInstanceUID
    study_item = Dataset.from_json(
        client.search_for_studies(search_filters={"PatientID": f"Q{tag}-1"})[0]
    )
    assert study_item.AccessionNumber == f"ACC{tag}1" and study_item.StudyDate == "20200615"
    assert "US" in study_item.ModalitiesInStudy

    # what cannot be matched is said, not ignored
    bad_key = dw_node.client.get("/dicomweb/studies", params={"PatientName": "X"})
    assert bad_key.status_code == 400 and "PatientName" in bad_key.json()["detail"]
    bad_date = dw_node.client.get("/dicomweb/studies", params={"StudyDate": "2020-06"})
    assert bad_date.status_code == 400 and "StudyDate" in bad_date.json()["detail"]
    empty = dw_node.client.get("/dicomweb/studies", params={"PatientID": "NOBODY-AT-ALL"})
    assert empty.status_code == 204

    # the queries are in the access log, the patient IDs and accession numbers are not
    assert dw_node.server is not None
    log = dw_node.server.log_path.read_text(errors="replace")
    assert "/dicomweb/studies?PatientID=***" in log
    assert f"Q{tag}" not in log and f"ACC{tag}" not in log


def test_stow_refuses_bad_input_and_stores_nothing_of_it(
    dw_node: Node, shared_data: Path, tmp_path: Path
) -> None:
    before = _stored_files(dw_node)
    studies_before = dw_node.client.get("/studies").json()["items"]

    # not multipart at all, or not application/dicom parts: 415
    plain = dw_node.client.post(
        "/dicomweb/studies", content=b"hello", headers={"Content-Type": "application/dicom"}
    )
    assert plain.status_code == 415
    xml = dw_node.client.post(
        "/dicomweb/studies",
        content=b"--b\r\n\r\nx\r\n--b--\r\n",
        headers={"Content-Type": 'multipart/related; type="application/dicom+xml"; boundary=b'},
    )
    assert xml.status_code == 415

    # malformed multipart: 400 with the reason
    no_boundary = dw_node.client.post(
        "/dicomweb/studies",
        content=b"whatever",
        headers={"Content-Type": 'multipart/related; type="application/dicom"'},
    )
    assert no_boundary.status_code == 400 and "boundary" in no_boundary.json()["detail"]
    truncated = dw_node.client.post(
        "/dicomweb/studies",
        content=b"--abc\r\nContent-Type: application/dicom\r\n\r\nDICM without end",
        headers={"Content-Type": STOW_TYPE.format("abc")},
    )
    assert truncated.status_code == 400 and "not terminated" in truncated.json()["detail"]

    # a well-formed body whose parts are refused: 409, each with its reason
    [good] = _us_files(shared_data, tmp_path / "good", "benign", 1, patient_id="DW-BAD-1")
    no_pixels = dcmread(good)
    del no_pixels.PixelData
    no_pixels_file = tmp_path / "no-pixels.dcm"
    no_pixels.save_as(no_pixels_file, enforce_file_format=True)
    good_uid = dcmread(good).SOPInstanceUID
    refused = _stow_raw(
        dw_node, [b"this is not DICOM", no_pixels_file.read_bytes(), good.read_bytes()[:300]]
    )
    assert refused.status_code == 409, refused.text
    answer = Dataset.from_json(refused.json())
    assert "ReferencedSOPSequence" not in answer
    reasons = [
        (int(i.FailureReason), i.get((0x0009, 0x1001)).value) for i in answer.FailedSOPSequence
    ]
    assert reasons[0] == (0xC000, "not a DICOM Part 10 file (no 128-byte preamble and DICM prefix)")
    assert reasons[1][0] == 0xC002 and "Pixel Data" in reasons[1][1]
    # a file cut after 300 bytes parses as a header without its UIDs
    assert reasons[2][0] in (0xC000, 0xC001) and reasons[2][1]
    assert answer.FailedSOPSequence[1].ReferencedSOPInstanceUID == no_pixels.SOPInstanceUID

    # into a named study, an instance of another study is refused (0xA900)
    wrong_study = _stow_raw(
        dw_node, [good.read_bytes()], path="/dicomweb/studies/1.2.3.4.5.6.7.8.9"
    )
    assert wrong_study.status_code == 409
    [item] = Dataset.from_json(wrong_study.json()).FailedSOPSequence
    assert int(item.FailureReason) == 0xA900
    assert item.ReferencedSOPInstanceUID == good_uid

    assert _stored_files(dw_node) == before
    assert dw_node.client.get("/studies").json()["items"] == studies_before
    assert not list((dw_node.workdir / "var" / "instances" / ".incoming").iterdir())

    # some good, some bad: 202, the good one stored once even when sent twice
    mixed = _stow_raw(dw_node, [good.read_bytes(), b"garbage", good.read_bytes()])
    assert mixed.status_code == 202, mixed.text
    answer = Dataset.from_json(mixed.json())
    assert [int(i.FailureReason) for i in answer.FailedSOPSequence] == [0xC000]
    assert [i.ReferencedSOPInstanceUID for i in answer.ReferencedSOPSequence] == [good_uid] * 2
    again = _stow_raw(dw_node, [good.read_bytes()])
    assert again.status_code == 200
    assert len(_stored_files(dw_node)) == len(before) + 1
    found = _client(dw_node).search_for_instances(search_filters={"SOPInstanceUID": str(good_uid)})
    assert len(found) == 1


def test_wado_negotiation_and_missing(dw_node: Node, shared_data: Path, tmp_path: Path) -> None:
    files = _us_files(shared_data, tmp_path / "w", "normal", 2, patient_id="DW-WADO-1")
    client = _client(dw_node)
    client.store_instances([dcmread(f) for f in files])
    first = dcmread(files[0])
    study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)

    # a series comes back as a multipart of the files as sent (dicomweb-client parses it)
    got = client.retrieve_series(study, series)
    assert sorted(str(d.SOPInstanceUID) for d in got) == sorted(
        str(dcmread(f).SOPInstanceUID) for f in files
    )
    url = f"/dicomweb/studies/{study}/series/{series}/instances/{first.SOPInstanceUID}"
    multipart = dw_node.client.get(url)
    assert multipart.headers["content-type"].startswith(
        'multipart/related; type="application/dicom"'
    )
    assert files[0].read_bytes() in multipart.content
    ok = dw_node.client.get(
        url,
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
    )
    assert ok.status_code == 200
    other_syntax = dw_node.client.get(
        url,
        headers={
            "Accept": 'multipart/related; type="application/dicom"; '
            "transfer-syntax=1.2.840.10008.1.2.4.50"
        },
    )
    assert other_syntax.status_code == 406 and "transcode" in other_syntax.json()["detail"]

    metadata = client.retrieve_instance_metadata(study, series, str(first.SOPInstanceUID))
    assert Dataset.from_json(metadata).PatientID == "DW-WADO-1"

    assert dw_node.client.get(f"/dicomweb/studies/{study}/series/1.2.3").status_code == 404
    assert dw_node.client.get("/dicomweb/studies/1.2.3.4").status_code == 404
    bad_accept = dw_node.client.get(f"{url}/rendered", headers={"Accept": "image/gif"})
    assert bad_accept.status_code == 406
