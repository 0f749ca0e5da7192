"""Every modality end to end, in one node run: storescu -> breastcad serve -> SR + SC in Orthanc.

One batch (to keep the suite quick) holds:
- a four-view screening mammography study built from mini-MIAS (one woman's right and left
  MLO films; mini-MIAS has no CC views, so the CC slots hold the same films with CC attributes),
  one series per view as many modalities send them (analysed as one study: one job, one SR
  over both breasts and all four series), patient name in ISO_IR 100;
- the two CBIS-DDSM samples (Secondary Capture, Modality MG, 16-bit RLE) and the MG test
  pattern;
- every US sample (RGB, PALETTE COLOR native and RLE, MONOCHROME2, YBR_FULL_422 JPEG
  multi-frame), a BUSI image with a patient name in ISO_IR 192 (UTF-8), and one JPEG-LS
  compressed (when pyjpegls, the encoder, is installed);
- a CT image and an SR document, which are stored and never analysed.

Until the bundled MG model lands, MG series are analysed by an untrained network of the
bundled architecture written into a model directory by a fixture (``model_dirs``): this test
checks the pipeline and the objects (orientation, groups, references, validity), never the
model's verdict.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np
import pytest
from node_process import Node
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    generate_uid,
)
from support.dcmtk import dciodvfy, require_tool, store_responses, storescu
from support.dicom_factory import busi_as_ultrasound, mias_as_mammogram, write_dataset
from support.orthanc import OrthancServer
from support.shared_data import busi_png_paths
from support.untrained_mg import write_untrained_mg_model

from inference import ModelNotAvailableError, image_from_dataset, load_bundled

pytestmark = pytest.mark.e2e

SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
MEASUREMENT_GROUP = "125007"
FINDING_SITE = "363698007"
LATERALITY = {"24028007": "R", "7771000": "L", "51440002": "B"}
UTF8_NAME = "山田^花子=ヤマダ^ハナコ"
LATIN1_NAME = "Müller-Lüdenscheidt^Zoë"


@pytest.fixture(scope="module")
def mg_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """[] when an MG model is bundled; else a directory with an untrained MG BusiCNN."""
    try:
        load_bundled("MG")
        return []
    except ModelNotAvailableError:
        pass
    return [str(write_untrained_mg_model(tmp_path_factory.mktemp("mg-model")))]


def _walk(items: Any) -> Iterator[Dataset]:
    for item in items:
        yield item
        if "ContentSequence" in item:
            yield from _walk(item.ContentSequence)


def _group_sides(sr: Dataset) -> list[str | None]:
    sides: list[str | None] = []
    for group in _walk(sr.ContentSequence):
        if group.get("ValueType") != "CONTAINER" or \
                group.ConceptNameCodeSequence[0].CodeValue != MEASUREMENT_GROUP:
            continue
        side = None
        for item in _walk(group.ContentSequence):
            if item.ConceptNameCodeSequence[0].CodeValue == FINDING_SITE:
                for modifier in item.get("ContentSequence", []):
                    side = LATERALITY.get(modifier.ConceptCodeSequence[0].CodeValue, side)
        sides.append(side)
    return sides


def _ct(path: Path) -> Path:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.PatientName = "CT^Only"
    ds.PatientID = "CT-1"
    ds.Rows = ds.Columns = 32
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.PixelData = np.zeros((32, 32), "<i2").tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return write_dataset(ds, path)


def _batch(shared_data: Path, tmp_path: Path) -> dict[str, list[Path]]:
    """Files by role."""
    batch: dict[str, list[Path]] = {}
    mias = shared_data / "mini-mias"
    if not (mias / "benign/mdb001.png").is_file():
        pytest.skip(f"mini-MIAS not found in {mias}")
    study = generate_uid()
    four: list[Path] = []
    views: list[tuple[str, Literal["L", "R"], Literal["CC", "MLO"]]] = [
        ("benign/mdb001.png", "R", "CC"), ("benign/mdb001.png", "R", "MLO"),
        ("benign/mdb002.png", "L", "CC"), ("benign/mdb002.png", "L", "MLO"),
    ]
    for number, (png, side, view) in enumerate(views, start=1):
        ds = mias_as_mammogram(mias / png, side=side, view=view, patient_id="MIAS-p001",
                               study_instance_uid=study, series_instance_uid=generate_uid(),
                               instance_number=1, patient_name=LATIN1_NAME)
        ds.SeriesNumber = number
        four.append(write_dataset(ds, tmp_path / "mg" / f"MG_{number}.dcm"))
    batch["mg_four_views"] = four
    samples = shared_data / "dicom-samples"
    batch["mg_samples"] = sorted((samples / "MG").glob("*.dcm"))
    us: list[Path] = []
    for path in sorted((samples / "US").glob("*.dcm")):
        if path.name == "OBXXXX1A_rle_2frame.dcm":
            # shares its SOPInstanceUID with examples_palette.dcm: its own UIDs, same pixels
            ds = dcmread(path)
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.SeriesInstanceUID = generate_uid()
            path = write_dataset(ds, tmp_path / "us" / path.name)
        us.append(path)
    batch["us_samples"] = us
    [png] = busi_png_paths(shared_data, "malignant")[:1]
    utf8 = busi_as_ultrasound(png, patient_id="BUSI-UTF8", patient_name=UTF8_NAME)
    utf8.SpecificCharacterSet = "ISO_IR 192"
    batch["us_utf8"] = [write_dataset(utf8, tmp_path / "us" / "utf8.dcm")]
    try:
        import jpeg_ls  # noqa: F401  (pyjpegls, pydicom's JPEG-LS encoder)

        [png] = busi_png_paths(shared_data, "benign")[:1]
        jls = busi_as_ultrasound(png, patient_id="BUSI-JLS", photometric="MONOCHROME2")
        jls.compress(JPEGLSLossless, encoding_plugin="pyjpegls")
        batch["us_jpegls"] = [write_dataset(jls, tmp_path / "us" / "jpegls.dcm")]
    except ImportError:
        batch["us_jpegls"] = []
    batch["ignored"] = [
        _ct(tmp_path / "other" / "ct.dcm"),
        samples / "SR" / "highdicom_sr_document_tid1500.dcm",
    ]
    return batch


def test_every_modality_end_to_end(
    shared_data: Path, orthanc: OrthancServer, tmp_path: Path, mg_model_dirs: list[str]
) -> None:
    require_tool("storescu")
    require_tool("dciodvfy")
    batch = _batch(shared_data, tmp_path)
    files = [path for paths in batch.values() for path in paths]
    headers: dict[Path, Dataset] = {
        path: dcmread(path, stop_before_pixels=True) for path in files
    }
    series_of = {str(ds.SeriesInstanceUID): ds for ds in headers.values()}
    ignored = {str(headers[p].SeriesInstanceUID) for p in batch["ignored"]}
    four_series = [str(headers[p].SeriesInstanceUID) for p in batch["mg_four_views"]]
    four_study = str(headers[batch["mg_four_views"][0]].StudyInstanceUID)
    with Node(
        tmp_path / "node",
        pacs_port=orthanc.dicom_port,
        extra={"series_quiet_seconds": 6, "model_dirs": mg_model_dirs, "us_max_frames": 8},
    ) as node:
        try:
            sent = storescu(files, "127.0.0.1", node.dicom_port)
            assert sent.returncode == 0, sent.stderr
            responses = store_responses(sent)
            assert responses == ["Success"] * len(files), responses
            # one job per series, but one for the four series of the mammography study
            jobs = _wait_for_jobs(node, len(series_of) - 3, timeout=600)
            log = node.log_tail(100_000)
            by_series = {j["series_instance_uid"]: j for j in jobs}
            assert len(by_series) == len(jobs) == len(series_of) - 3
            assert by_series[four_series[0]]["series_instance_uids"] == four_series
            assert {uid for j in jobs for uid in j["series_instance_uids"]} == set(series_of)
            for uid, job in by_series.items():
                if uid in ignored:
                    assert job["state"] == "done", job
                    assert job["reason"].startswith("not analysed: Modality "), job
                else:
                    assert job["state"] == "done" and job["reason"] is None, (uid, job)
            # the four views completed the study before its quiet period
            assert f"mammography study {four_study} complete (mammography view set whole): " \
                f"job {by_series[four_series[0]]['id']} over 4 series" in log
            _check_pacs(node, orthanc, batch, headers, ignored, tmp_path)
        except AssertionError:
            print(node.log_tail())
            raise


def _wait_for_jobs(node: Node, count: int, timeout: float) -> list[dict[str, Any]]:
    """Node.wait_for_jobs, riding out a keep-alive connection the busy API closed under us
    (seen once: ECONNRESET while the worker thread decoded 4k x 3k mammograms)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return node.wait_for_jobs(count, timeout=max(1.0, deadline - time.monotonic()))
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def _check_pacs(
    node: Node,
    orthanc: OrthancServer,
    batch: dict[str, list[Path]],
    headers: dict[Path, Dataset],
    ignored: set[str],
    tmp_path: Path,
) -> None:
    analysed = [p for role, paths in batch.items() if role != "ignored" for p in paths]
    analysed_series = {str(headers[p].SeriesInstanceUID) for p in analysed}
    source_of = {str(headers[p].SOPInstanceUID): p for p in analysed}
    units = len(analysed_series) - 3  # the four-series mammography study is one

    def arrived(tags: list[dict[str, Any]]) -> bool:
        srs = [t for t in tags if t.get("Modality") == "SR"]
        scs = [t for t in tags if t.get("SOPClassUID") == SC_STORAGE]
        return len(srs) >= units and len(scs) >= len(analysed)

    tags = orthanc.wait_for_instances(arrived, timeout=180)
    folder = tmp_path / "from-pacs"
    folder.mkdir()
    srs: dict[str, Dataset] = {}
    scs: dict[str, Dataset] = {}
    for tag in tags:
        if tag.get("Modality") != "SR" and tag.get("SOPClassUID") != SC_STORAGE:
            continue
        path = folder / f"{tag['SOPInstanceUID']}.dcm"
        path.write_bytes(orthanc.instance_file(tag["OrthancID"]))
        verdict = dciodvfy(path)
        assert verdict.errors == [], (path.name, verdict.output)
        ds = dcmread(path)
        if ds.Modality == "SR":
            [evidence] = ds.CurrentRequestedProcedureEvidenceSequence
            for referenced in evidence.ReferencedSeriesSequence:
                assert str(referenced.SeriesInstanceUID) not in srs  # one SR per series
                srs[str(referenced.SeriesInstanceUID)] = ds
        else:
            scs[str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)] = ds
    assert set(srs) == analysed_series  # one SR per analysed series; none for CT or SR
    assert len({sr.SOPInstanceUID for sr in srs.values()}) == units
    assert set(scs) == set(source_of)  # one heatmap SC per analysed image
    assert not ignored & set(srs)

    # mammography: one SR for the study's four series, one group per breast (right, left),
    # then the study's (right and left); CBIS samples one group each
    four = [str(headers[p].SeriesInstanceUID) for p in batch["mg_four_views"]]
    assert len({srs[uid].SOPInstanceUID for uid in four}) == 1
    assert _group_sides(srs[four[0]]) == ["R", "L", "B"]
    for path in batch["mg_samples"]:
        side = headers[path].get("ImageLaterality") or headers[path].get("Laterality")
        assert _group_sides(srs[str(headers[path].SeriesInstanceUID)]) == [side], path.name

    # the SC is in the orientation the radiologist sees: it matches the source as received
    for path in batch["mg_four_views"] + batch["mg_samples"]:
        source = dcmread(path)
        sc = scs[str(source.SOPInstanceUID)]
        shown = sc.pixel_array.mean(axis=2)
        # shown at most mg_max_side (2048) on the longer side: compare at the SC's size
        full = Image.fromarray(image_from_dataset(source)).convert("L")
        display = np.asarray(full.resize((sc.Columns, sc.Rows), Image.Resampling.BOX), float)
        assert max(sc.Rows, sc.Columns) <= 2048
        step = max(1, display.shape[0] // 256)
        a, b = display[::step, ::step].ravel(), shown[::step, ::step].ravel()
        mirrored = display[::step, ::step][:, ::-1].ravel()
        assert np.corrcoef(a, b)[0, 1] > np.corrcoef(mirrored, b)[0, 1] + 0.2, path.name
        assert sc.Laterality == (source.get("ImageLaterality") or source.get("Laterality"))

    # multi-frame US: the SC shows the most suspicious sampled frame, the SR names it
    results = {}
    for path in analysed:
        uid = str(headers[path].SeriesInstanceUID)
        study = str(headers[path].StudyInstanceUID)
        entry = [s for s in node.client.get(f"/studies/{study}").json()["series"]
                 if s["series_instance_uid"] == uid][0]
        results[uid] = entry["results"][-1]
    for path in batch["us_samples"]:
        frames = int(headers[path].get("NumberOfFrames") or 1)
        sop = str(headers[path].SOPInstanceUID)
        [item] = [p for p in results[str(headers[path].SeriesInstanceUID)]["per_image"]
                  if p["sop_instance_uid"] == sop]
        sc = scs[sop]
        if frames > 1:
            assert item["frame_number"] in item["frames_analysed"]
            assert len(item["frames_analysed"]) == min(frames, 8)
            assert int(sc.SourceImageSequence[0].ReferencedFrameNumber) == item["frame_number"]
            sr = srs[str(headers[path].SeriesInstanceUID)]
            framed = [i.ReferencedSOPSequence[0] for i in _walk(sr.ContentSequence)
                      if i.get("ValueType") == "IMAGE"
                      and "ReferencedFrameNumber" in i.ReferencedSOPSequence[0]]
            assert [int(r.ReferencedFrameNumber) for r in framed] == [item["frame_number"]]
        else:
            assert item["frame_number"] is None
            assert "ReferencedFrameNumber" not in sc.SourceImageSequence[0]

    # the API: the study's result, its breasts and the views each used
    study_uid = str(headers[batch["mg_four_views"][0]].StudyInstanceUID)
    body = node.client.get(f"/studies/{study_uid}").json()
    [mammo_result] = body["results"]
    assert mammo_result["series_instance_uids"] == four
    breasts = mammo_result["breasts"]
    assert [b["laterality"] for b in breasts] == ["R", "L"]
    assert [[v["view_position"] for v in b["views"]] for b in breasts] == [["CC", "MLO"]] * 2
    assert [v["series_instance_uid"] for b in breasts for v in b["views"]] == four

    # patient names survive unchanged, in their character sets
    for path in batch["us_utf8"] + batch["mg_four_views"][:1]:
        sr = srs[str(headers[path].SeriesInstanceUID)]
        assert str(sr.PatientName) == str(headers[path].PatientName)
        assert sr.SpecificCharacterSet == headers[path].SpecificCharacterSet
        assert str(scs[str(headers[path].SOPInstanceUID)].PatientName) == \
            str(headers[path].PatientName)
