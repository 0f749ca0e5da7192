"""A SOP Instance stored twice under different Study/Series UIDs is stored once.

Real SQLite state DB and instance store. The fuzz test (tests/reliability/test_bad_input.py)
found the case: the store skips its DB look-up when no file is at the instance's path, so the
second copy was written to its own path and left there beside the row of the first.
"""

from __future__ import annotations

from pathlib import Path

from pydicom.uid import generate_uid
from test_series_writes import _instance

from dicom_node.db import StateDB
from dicom_node.settings import Settings
from dicom_node.store import InstanceStore


def test_same_sop_instance_under_another_study_is_stored_once(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)  # type: ignore[call-arg]
    db = StateDB(settings.sqlalchemy_url)
    store = InstanceStore(settings.store_dir, db)
    try:
        key, encoded, ds = _instance(generate_uid(), generate_uid())
        first = store.store(key, encoded, ds, "TEST")
        assert not first.duplicate
        other = type(key)(
            sop_class_uid=key.sop_class_uid, sop_instance_uid=key.sop_instance_uid,
            series_instance_uid=generate_uid(), study_instance_uid=generate_uid(),
            transfer_syntax_uid=key.transfer_syntax_uid,
        )
        again = store.store(other, encoded, ds, "TEST")
        assert again.duplicate and again.path == first.path
        files = [p for p in settings.store_dir.rglob("*.dcm")]
        assert files == [first.path]
        assert list(store.incoming.iterdir()) == []
    finally:
        db.dispose()
