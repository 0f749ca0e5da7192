"""A mammography study is one analysis unit, whatever its series: dispatcher -> analyse -> SR,
SCs, result row and API, on a real SQLite state DB and instance store.

Four mini-MIAS views (scaled to 256 px) arrive as four series of one image each; one job covers
them, one SR covers both breasts (a group per breast, a study group) and references every
image of every series, one SC per image. A late instance in one series makes a new study result
whose SR names its predecessor, with UIDs derived from the StudyInstanceUID and the sorted
source SOP Instance UIDs. The classifier is an untrained network (``model_dirs``): the
pipeline is checked, never the verdict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select
from support.dcmtk import dciodvfy, require_tool
from support.dicom_factory import mias_as_mammogram, store_dataset
from support.untrained_mg import write_untrained_mg_model

from dicom_node.api import create_api
from dicom_node.db import Job, Result, StateDB
from dicom_node.dispatch import Dispatcher
from dicom_node.settings import Settings
from dicom_node.store import InstanceStore
from reports import derive_uid
from reports.uids import source_set
from workers.tasks import WorkerContext, analyse

MEASUREMENT_GROUP = "125007"
FINDING_SITE = "363698007"
SIDES = {"24028007": "R", "7771000": "L", "51440002": "B"}
VIEWS = [("mdb001", "R", "CC"), ("mdb001", "R", "MLO"), ("mdb002", "L", "CC"),
         ("mdb002", "L", "MLO")]


def _png(shared_data: Path, name: str, folder: Path) -> Path:
    [source] = sorted((shared_data / "mini-mias").glob(f"*/{name}.png")) or [None]
    if source is None:
        pytest.skip(f"mini-MIAS {name} not in shared data")
    path = folder / f"{name}.png"
    if not path.exists():
        with Image.open(source) as im:
            im.convert("L").resize((256, 256), Image.Resampling.BOX).save(path)
    return path


def _groups(sr: Dataset) -> list[tuple[str | None, set[str]]]:
    """(laterality of the finding site, referenced SOP Instance UIDs) per measurement group."""
    def walk(items: Any) -> Any:
        for item in items:
            yield item
            if "ContentSequence" in item:
                yield from walk(item.ContentSequence)

    found = []
    for group in walk(sr.ContentSequence):
        if group.get("ValueType") != "CONTAINER" or \
                group.ConceptNameCodeSequence[0].CodeValue != MEASUREMENT_GROUP:
            continue
        side, images = None, set()
        for item in walk(group.ContentSequence):
            if item.ConceptNameCodeSequence[0].CodeValue == FINDING_SITE:
                for modifier in item.get("ContentSequence", []):
                    side = SIDES.get(modifier.ConceptCodeSequence[0].CodeValue, side)
            if item.get("ValueType") == "IMAGE":
                images.add(str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
        found.append((side, images))
    return found


class Node:
    """Store, dispatcher and worker of one node, in this process."""

    def __init__(self, tmp_path: Path, model_dir: Path, database_url: str | None = None) -> None:
        self.settings = Settings(data_dir=tmp_path / "node", series_quiet_seconds=3600,
                                 model_dirs=[model_dir], similar_cases_in_sr=0,
                                 database_url=database_url)
        self.db = StateDB(self.settings.sqlalchemy_url)
        self.store = InstanceStore(self.settings.store_dir, self.db)
        self.sent: list[int] = []
        self.dispatcher = Dispatcher(self.settings, self.db, self.sent.append, lambda _id: None)
        self.ctx = WorkerContext(self.settings, self.db)

    def receive(self, ds: Dataset) -> None:
        store_dataset(self.store, ds, "MODALITY")

    def run(self) -> list[int]:
        """Complete what is due and analyse its jobs; the new job ids."""
        created = self.dispatcher.complete_quiet_series()
        for job_id in created:
            assert analyse(self.ctx, job_id) == "done", self.job(job_id).reason
        return created

    def job(self, job_id: int) -> Job:
        with self.db.session() as session:
            job = session.get(Job, job_id)
            assert job is not None
            return job

    def result(self, job_id: int) -> Result:
        with self.db.session() as session:
            result = session.scalars(select(Result).where(Result.job_id == job_id)).one()
            return result


def test_four_views_in_four_series_make_one_study_result(
    shared_data: Path, tmp_path: Path
) -> None:
    require_tool("dciodvfy")
    node = Node(tmp_path, write_untrained_mg_model(tmp_path / "model"))
    study = generate_uid()
    series = [generate_uid() for _ in VIEWS]
    sources = []
    for number, (uid, (name, side, view)) in enumerate(zip(series, VIEWS, strict=True), 1):
        ds = mias_as_mammogram(_png(shared_data, name, tmp_path), side=side, view=view,
                               patient_id="MIAS-S1", study_instance_uid=study,
                               series_instance_uid=uid, instance_number=1)
        ds.SeriesNumber = number
        sources.append(ds)
        node.receive(ds)
    [job_id] = node.run()  # the view set is whole: one job, no quiet period
    result = node.result(job_id)
    assert result.series_instance_uid == series[0]
    sops = [str(ds.SOPInstanceUID) for ds in sources]
    assert [p["sop_instance_uid"] for p in result.files["per_image"]] == sops
    assert [p["series_instance_uid"] for p in result.files["per_image"]] == series

    sr = dcmread(node.settings.results_dir / result.files["sr"])
    model = (result.model_name, result.model_version, result.model_sha256)
    assert sr.SOPInstanceUID == derive_uid(study, *model, source_set(sops), "sr-instance")
    [evidence] = sr.CurrentRequestedProcedureEvidenceSequence
    assert {str(s.SeriesInstanceUID) for s in evidence.ReferencedSeriesSequence} == set(series)
    assert _groups(sr) == [("R", set(sops[:2])), ("L", set(sops[2:])), ("B", set(sops))]
    assert "PredecessorDocumentsSequence" not in sr
    scs = [dcmread(node.settings.results_dir / name) for name in result.files["sc"]]
    assert [str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID) for sc in scs] == sops
    assert len({sc.SeriesInstanceUID for sc in scs}) == 1
    assert [int(sc.InstanceNumber) for sc in scs] == [1, 2, 3, 4]
    for path in [result.files["sr"], *result.files["sc"]]:
        verdict = dciodvfy(node.settings.results_dir / path)
        assert verdict.errors == [], (path, verdict.output)

    # the API: the result under every series it covers, once for the study, with its breasts
    client = TestClient(create_api(node.settings, node.db))
    body = client.get(f"/studies/{study}").json()
    [study_result] = body["results"]
    assert study_result["id"] == result.id
    assert study_result["series_instance_uids"] == series
    for entry in body["series"]:
        assert [r["id"] for r in entry["results"]] == [result.id]
        assert entry["job_state"] == "done"
    breasts = study_result["breasts"]
    assert [b["laterality"] for b in breasts] == ["R", "L"]
    assert [[v["view_position"] for v in b["views"]] for b in breasts] == [["CC", "MLO"]] * 2
    assert [v["sop_instance_uid"] for b in breasts for v in b["views"]] == sops
    assert [v["heatmap"] for v in breasts[1]["views"]] == [
        f"/results/{result.id}/heatmap.png?index={i}" for i in (3, 4)]
    worst = max(breasts, key=lambda b: b["probabilities"]["malignant"])
    assert study_result["probabilities"] == worst["probabilities"]
    [item] = client.get("/worklist").json()["items"]
    assert item["state"] == "done" and item["result_ids"] == [result.id]
    report = client.get(f"/fhir/DiagnosticReport/{result.id}").json()
    observations = {r["id"]: r for r in report["contained"]}
    assert [observations[f"breast-{side}"]["bodySite"]["coding"][0]["code"]
            for side in ("right", "left")] == ["73056007", "80248007"]
    assert observations["finding"]["bodySite"]["coding"][0]["code"] == "76752008"  # both
    [job] = client.get("/jobs").json()["items"]
    assert job["series_instance_uids"] == series

    # a late view in the second series re-opens it: after the quiet period, a new study
    # result over all five images, whose SR names the first
    late = mias_as_mammogram(_png(shared_data, "mdb001", tmp_path), side="R", view="CC",
                             patient_id="MIAS-S1", study_instance_uid=study,
                             series_instance_uid=series[1], instance_number=2)
    node.receive(late)
    assert node.run() == []  # the view set was whole before: the quiet rule decides now
    node.settings.series_quiet_seconds = 0
    [second_job] = node.run()
    second = node.result(second_job)
    assert second.predecessor_id == result.id
    assert second.series_instance_uid == series[0]
    five = sops + [str(late.SOPInstanceUID)]
    new_sr = dcmread(node.settings.results_dir / second.files["sr"])
    assert new_sr.SOPInstanceUID == derive_uid(study, *model, source_set(five), "sr-instance")
    [previous] = new_sr.PredecessorDocumentsSequence
    assert previous.ReferencedSeriesSequence[0].ReferencedSOPSequence[0] \
        .ReferencedSOPInstanceUID == sr.SOPInstanceUID
    assert [side for side, _ in _groups(new_sr)] == ["R", "L", "B"]
    assert not dciodvfy(node.settings.results_dir / second.files["sr"]).errors
    [item] = client.get("/worklist").json()["items"]
    assert item["result_ids"] == [second.id]
