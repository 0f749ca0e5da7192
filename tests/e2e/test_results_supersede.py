"""A result that changes is a new SR that names its predecessor, never a silent overwrite.

A late instance re-opens a completed series; its second analysis makes a new SR (new UIDs,
derived from the new set of source instances) with the first SR in its Predecessor Documents
Sequence, and the PACS (a real Orthanc) keeps both.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import pytest
from node_process import Node
from pydicom import dcmread
from support.dcmtk import dciodvfy, dsrdump, require_tool, storescu
from support.dicom_factory import make_us_series
from support.orthanc import OrthancServer
from support.shared_data import busi_png_paths

from reports import derive_uid
from reports.uids import source_set

pytestmark = pytest.mark.e2e


def _results(node: Node, study_uid: str) -> list[dict[str, Any]]:
    study = node.client.get(f"/studies/{study_uid}").json()
    [series] = study["series"]
    return list(series["results"])


def _wait_delivered(node: Node, count: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        items = node.client.get("/deliveries").json()["items"]
        if len(items) >= count and all(d["state"] == "done" for d in items):
            return
        time.sleep(0.3)
    raise AssertionError(f"deliveries not done: {node.client.get('/deliveries').json()}")


def test_a_late_instance_makes_a_new_sr_that_references_its_predecessor(
    shared_data: Path, orthanc: OrthancServer, tmp_path: Path
) -> None:
    require_tool("storescu")
    require_tool("dciodvfy")
    require_tool("dsrdump")
    first_file, late_file = make_us_series(
        busi_png_paths(shared_data, "benign")[5:7], tmp_path / "src", patient_id="LATE-1"
    )
    first_ds = dcmread(first_file, stop_before_pixels=True)
    late_ds = dcmread(late_file, stop_before_pixels=True)
    study_uid, series_uid = str(first_ds.StudyInstanceUID), str(first_ds.SeriesInstanceUID)
    with Node(tmp_path / "node", pacs_port=orthanc.dicom_port) as node:
        try:
            assert storescu([first_file], "127.0.0.1", node.dicom_port).returncode == 0
            node.wait_for_jobs(1)
            _wait_delivered(node, 1)
            # the late instance re-opens the series: a second job, a second result
            assert storescu([late_file], "127.0.0.1", node.dicom_port).returncode == 0
            jobs = node.wait_for_jobs(2)
            assert [j["state"] for j in jobs] == ["done", "done"], jobs
            _wait_delivered(node, 2)

            first, second = _results(node, study_uid)
            assert first["predecessor_id"] is None
            assert second["predecessor_id"] == first["id"]
            assert [p["sop_instance_uid"] for p in first["per_image"]] == [
                str(first_ds.SOPInstanceUID)
            ]
            assert len(second["per_image"]) == 2

            # deterministic per (source instances, model): the documented derivation
            for result, sops in (
                (first, [first_ds.SOPInstanceUID]),
                (second, [first_ds.SOPInstanceUID, late_ds.SOPInstanceUID]),
            ):
                model = result["model"]
                assert result["sr_sop_instance_uid"] == derive_uid(
                    series_uid, model["name"], model["version"], model["sha256"],
                    source_set(str(s) for s in sops), "sr-instance",
                )

            # the new SR names the old one; both pass dciodvfy and dsrdump
            paths = []
            for result in (first, second):
                path = tmp_path / f"sr-{result['id']}.dcm"
                path.write_bytes(node.client.get(result["sr"]).content)
                assert not dciodvfy(path).errors, path
                rendered = dsrdump(path)
                assert rendered.returncode == 0
                assert not [line for line in rendered.stdout.splitlines()
                            if line.startswith(("E:", "F:"))]
                paths.append(path)
            old, new = (dcmread(p) for p in paths)
            assert "PredecessorDocumentsSequence" not in old
            [study_ref] = new.PredecessorDocumentsSequence
            assert study_ref.StudyInstanceUID == study_uid
            [series_ref] = study_ref.ReferencedSeriesSequence
            assert series_ref.SeriesInstanceUID == old.SeriesInstanceUID
            [sop_ref] = series_ref.ReferencedSOPSequence
            assert sop_ref.ReferencedSOPInstanceUID == old.SOPInstanceUID
            assert sop_ref.ReferencedSOPClassUID == old.SOPClassUID
            assert new.SeriesInstanceUID != old.SeriesInstanceUID

            # the PACS keeps both SRs and both generations of heatmaps (no UID reused)
            def both(tags: list[dict[str, Any]]) -> bool:
                srs = {t.get("SOPInstanceUID") for t in tags if t.get("Modality") == "SR"}
                scs = [t for t in tags if t.get("Modality") == "OT"]
                return srs >= {old.SOPInstanceUID, new.SOPInstanceUID} and len(scs) >= 3

            tags = orthanc.wait_for_instances(both, timeout=60)
            sc_uids = [t["SOPInstanceUID"] for t in tags if t.get("Modality") == "OT"]
            assert len(sc_uids) == len(set(sc_uids)) == 3
            stored_old = dcmread(io.BytesIO(orthanc.instance_file(
                next(t["OrthancID"] for t in tags if t["SOPInstanceUID"] == old.SOPInstanceUID)
            )))
            assert "PredecessorDocumentsSequence" not in stored_old

            # the worklist shows the current result only; FHIR lists both reports
            [item] = node.client.get("/worklist").json()["items"]
            assert item["result_ids"] == [second["id"]]
            bundle = node.client.get("/fhir/DiagnosticReport", params={"study": study_uid}).json()
            assert bundle["total"] == 2
        except AssertionError:
            print(node.log_tail())
            raise
