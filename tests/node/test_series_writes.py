"""A series is not completed while one of its instances is still being written.

A real SQLite state DB, instance store and dispatcher sharing one ``SeriesWrites``; the broker
messages go to a list. The slow write is real: a store whose file write waits on an event in
another thread (as an fsync on a loaded disk would), then writes the file as usual.
"""

from __future__ import annotations

import threading
import time
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select
from support.dicom_factory import tiny_image

from dicom_node.db import Job, StateDB
from dicom_node.dispatch import Dispatcher
from dicom_node.settings import Settings
from dicom_node.store import InstanceKey, InstanceStore, SeriesWrites

US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"


class SlowStore(InstanceStore):
    """Writes like the store, but a file write waits until ``release`` is set."""

    def __init__(self, root: Path, db: StateDB, writes: SeriesWrites) -> None:
        super().__init__(root, db, writes)
        self.release = threading.Event()
        self.slow = False

    def _write_file(self, path: Path, data: bytes) -> None:
        if self.slow:
            assert self.release.wait(30)
        super()._write_file(path, data)


def _instance(study: str, series: str) -> tuple[InstanceKey, bytes, Dataset]:
    ds = tiny_image(study, series, US_IMAGE_STORAGE, "US")
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    key = InstanceKey(
        sop_class_uid=US_IMAGE_STORAGE, sop_instance_uid=str(ds.SOPInstanceUID),
        series_instance_uid=series, study_instance_uid=study,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    return key, buffer.getvalue(), ds


def test_series_with_an_instance_being_written_is_not_completed(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, series_quiet_seconds=0.2)  # type: ignore[call-arg]
    db = StateDB(settings.sqlalchemy_url)
    writes = SeriesWrites()
    store = SlowStore(settings.store_dir, db, writes)
    sent: list[int] = []
    dispatcher = Dispatcher(settings, db, sent.append, lambda _id: None, writes=writes)
    study, series = generate_uid(), generate_uid()
    try:
        store.store(*_instance(study, series), "TEST")
        store.slow = True
        second = threading.Thread(target=store.store, args=(*_instance(study, series), "TEST"))
        second.start()
        deadline = time.monotonic() + 10
        while series not in writes.active():
            assert time.monotonic() < deadline, "the second write never started"
            time.sleep(0.01)
        time.sleep(0.5)  # the first instance is now older than the quiet period
        assert dispatcher.complete_quiet_series() == []  # the second is still being written
        store.release.set()
        second.join(30)
        assert writes.active() == frozenset()
        time.sleep(0.5)
        [job_id] = dispatcher.complete_quiet_series()
        with db.session() as session:
            [job] = session.scalars(select(Job)).all()
            assert job.id == job_id
            assert job.instance_count == 2  # analysed once, with both instances
    finally:
        store.release.set()
        db.dispose()
