"""Mammography completes per study (by view set or quiet period) and the series that are never
analysed.

A real SQLite state DB and instance store; the dispatcher's broker messages go to a list.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, generate_uid
from sqlalchemy import select
from support.dicom_factory import store_dataset, tiny_image

from dicom_node.db import Job, JobSeries, Series, StateDB
from dicom_node.dispatch import Dispatcher
from dicom_node.settings import Settings
from dicom_node.store import InstanceStore

MG_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"


class Node:
    def __init__(self, tmp_path: Path, **settings: object) -> None:
        settings.setdefault("series_quiet_seconds", 3600)
        self.settings = Settings(data_dir=tmp_path, **settings)  # type: ignore[arg-type]
        self.db = StateDB(self.settings.sqlalchemy_url)
        self.store = InstanceStore(self.settings.store_dir, self.db)
        self.sent: list[int] = []
        self.dispatcher = Dispatcher(self.settings, self.db, self.sent.append, lambda _id: None)

    def receive(self, ds: Dataset) -> None:
        store_dataset(self.store, ds)

    def jobs(self) -> dict[str, Job]:
        with self.db.session() as session:
            return {job.series_instance_uid: job for job in session.scalars(select(Job)).all()}

    def covered(self, job_id: int) -> set[str]:
        with self.db.session() as session:
            return set(session.scalars(
                select(JobSeries.series_instance_uid).where(JobSeries.job_id == job_id)
            ).all())

    def series_state(self, uid: str) -> str:
        with self.db.session() as session:
            row = session.get(Series, uid)
            assert row is not None
            return row.state


def _image(study: str, series: str, sop_class: str = MG_PRESENTATION, modality: str = "MG",
           **attributes: object) -> Dataset:
    return tiny_image(study, series, sop_class, modality, **attributes)


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path)


def test_four_views_complete_the_study_before_the_quiet_period(node: Node) -> None:
    study, series = generate_uid(), generate_uid()
    views = [("R", "CC"), ("L", "CC"), ("R", "MLO")]
    for side, view in views:
        node.receive(_image(study, series, ImageLaterality=side, ViewPosition=view))
    assert node.dispatcher.complete_quiet_series() == []  # three views: still waiting
    assert node.series_state(series) == "receiving"
    # the fourth, its view only in ViewCodeSequence and its side in Laterality
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "399368009", "SCT", "MLO"
    node.receive(_image(study, series, Laterality="L", ViewCodeSequence=[code]))
    [job_id] = node.dispatcher.complete_quiet_series()
    assert node.series_state(series) == "complete"
    assert node.jobs()[series].instance_count == 4
    node.dispatcher.send_pending_jobs()
    assert node.sent == [job_id]


def test_views_spread_over_series_make_one_study_job(node: Node) -> None:
    """Four views in four series (one image each, as many modalities send them): the study
    completes at once and one job covers every series, keyed by the first received."""
    study = generate_uid()
    series = [generate_uid() for _ in range(4)]
    views = [("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO")]
    for uid, (side, view) in list(zip(series, views, strict=True))[:3]:
        node.receive(_image(study, uid, ImageLaterality=side, ViewPosition=view))
    assert node.dispatcher.complete_quiet_series() == []
    node.receive(_image(study, series[3], ImageLaterality="L", ViewPosition="MLO"))
    [job_id] = node.dispatcher.complete_quiet_series()
    assert set(node.jobs()) == {series[0]}
    job = node.jobs()[series[0]]
    assert job.id == job_id and job.instance_count == 4
    assert node.covered(job_id) == set(series)
    assert {node.series_state(uid) for uid in series} == {"complete"}
    assert node.dispatcher.complete_quiet_series() == []  # completed once


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_study_is_quiet_only_when_all_its_mammo_series_are(
    tmp_path: Path, database: str, request: pytest.FixtureRequest
) -> None:
    """Two series of one study, one quiet and one still receiving: nothing completes until the
    other is quiet too; then one job over both. A series of another modality in the study is
    not part of it. (On PostgreSQL too: the completing UPDATE is one statement with a NOT
    EXISTS over the same table.)"""
    url = request.getfixturevalue("postgres_db") if database == "postgresql" else None
    node = Node(tmp_path, database_url=url)
    study, first, second, us = generate_uid(), generate_uid(), generate_uid(), generate_uid()
    node.receive(_image(study, first, ImageLaterality="R", ViewPosition="CC"))
    node.receive(_image(study, us, sop_class="1.2.840.10008.5.1.4.1.1.6.1", modality="US"))
    node.settings.series_quiet_seconds = 0.5
    time.sleep(0.6)
    node.receive(_image(study, second, ImageLaterality="L", ViewPosition="CC"))
    created = node.dispatcher.complete_quiet_series()
    assert len(created) == 1 and set(node.jobs()) == {us}  # the US series alone
    assert node.series_state(first) == "receiving"  # waits for its study
    time.sleep(0.6)
    [job_id] = node.dispatcher.complete_quiet_series()
    assert node.covered(job_id) == {first, second}
    assert node.jobs()[first].instance_count == 2


def test_a_late_instance_makes_a_new_study_job_over_all_its_series(tmp_path: Path) -> None:
    node = Node(tmp_path, series_quiet_seconds=0)
    study, first, second = generate_uid(), generate_uid(), generate_uid()
    node.receive(_image(study, first, ImageLaterality="R", ViewPosition="CC"))
    node.receive(_image(study, second, ImageLaterality="L", ViewPosition="CC"))
    [job_one] = node.dispatcher.complete_quiet_series()
    node.receive(_image(study, second, ImageLaterality="L", ViewPosition="MLO"))  # re-opens it
    assert node.series_state(second) == "receiving"
    [job_two] = node.dispatcher.complete_quiet_series()
    assert node.covered(job_one) == node.covered(job_two) == {first, second}
    with node.db.session() as session:
        counts = [session.get(Job, j).instance_count for j in (job_one, job_two)]  # type: ignore[union-attr]
    assert counts == [2, 3]


def test_mammography_not_analysed_stays_per_series(tmp_path: Path) -> None:
    node = Node(tmp_path, series_quiet_seconds=0, analysed_modalities=["US"])
    study, first, second = generate_uid(), generate_uid(), generate_uid()
    node.receive(_image(study, first, ImageLaterality="R", ViewPosition="CC"))
    node.receive(_image(study, second, ImageLaterality="L", ViewPosition="CC"))
    assert len(node.dispatcher.complete_quiet_series()) == 2
    assert {job.state for job in node.jobs().values()} == {"done"}  # stored, not analysed


def test_two_views_wait_for_the_quiet_period(tmp_path: Path) -> None:
    node = Node(tmp_path)
    study, series = generate_uid(), generate_uid()
    node.receive(_image(study, series, ImageLaterality="R", ViewPosition="CC"))
    node.receive(_image(study, series, ImageLaterality="R", ViewPosition="MLO"))
    assert node.dispatcher.complete_quiet_series() == []
    node.settings.series_quiet_seconds = 0
    assert len(node.dispatcher.complete_quiet_series()) == 1  # one breast still gets a result


def test_quiet_period_rule_ignores_the_view_set(tmp_path: Path) -> None:
    node = Node(tmp_path, mammo_view_set="quiet_period")
    study, series = generate_uid(), generate_uid()
    for side, view in [("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO")]:
        node.receive(_image(study, series, ImageLaterality=side, ViewPosition=view))
    assert node.dispatcher.complete_quiet_series() == []


def test_a_modality_without_pipeline_is_stored_and_never_sent(node: Node) -> None:
    ct_series = generate_uid()
    ct = _image(generate_uid(), ct_series, sop_class=CTImageStorage, modality="CT")
    node.receive(ct)
    node.settings.series_quiet_seconds = 0
    [job_id] = node.dispatcher.complete_quiet_series()
    job = node.jobs()[ct_series]
    assert job.id == job_id and job.state == "done"
    assert job.reason == ("not analysed: Modality 'CT' has no analysis pipeline "
                          "(analysed: MG, SM, US)")
    node.dispatcher.send_pending_jobs()
    assert node.sent == []
    assert node.store.exists(str(ct.SOPInstanceUID))  # stored all the same
