"""The instance store: a received instance is durable (file fsync'd and renamed, row committed)
before anyone is told it was stored; a duplicate SOP Instance is stored once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydicom.dataset import Dataset
from sqlalchemy import Connection, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from dicom_node.db import Instance, Series, SeriesState, StateDB, Study, utcnow

log = logging.getLogger(__name__)


class StoreWriteError(OSError):
    """The store could not write (disk full, permissions, I/O error): DICOM 0xA700."""


@dataclass(frozen=True)
class InstanceKey:
    """The identity of a received instance, checked before anything is written."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    transfer_syntax_uid: str


@dataclass(frozen=True)
class StoreOutcome:
    path: Path
    duplicate: bool


def _safe_component(uid: str) -> str:
    # UIDs are digits and dots; anything else is refused before it reaches a path
    if not uid or len(uid) > 64 or any(c not in "0123456789." for c in uid):
        raise ValueError(f"not a valid UID: {uid!r}")
    return uid


class SeriesWrites:
    """The series that have an instance being written right now, in this process.

    The listener and the STOW-RS service write through stores that share one of these with the
    dispatcher, which does not complete a series while one of its instances is still being
    written: on a loaded machine the fsyncs and the row commit of one instance can take longer
    than ``series_quiet_seconds``, and completing the series then would analyse it without that
    instance, and again (a second, superseding result) once it lands.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    @contextlib.contextmanager
    def writing(self, series_instance_uid: str) -> Iterator[None]:
        with self._lock:
            self._counts[series_instance_uid] += 1
        try:
            yield
        finally:
            with self._lock:
                self._counts[series_instance_uid] -= 1
                if self._counts[series_instance_uid] <= 0:
                    del self._counts[series_instance_uid]

    def active(self) -> frozenset[str]:
        """The series with a write in progress."""
        with self._lock:
            return frozenset(self._counts)


#: Where files are written before they are renamed into place (same filesystem as the store).
INCOMING = ".incoming"


class InstanceStore:
    """Files under ``root/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``.

    A file is first written under ``root/.incoming/`` and renamed into place once fsync'd, so a
    process killed mid-write leaves its half-written file only there;
    :meth:`remove_incoming` (called by the listener at start) clears them.
    """

    def __init__(self, root: Path, db: StateDB, writes: SeriesWrites | None = None) -> None:
        self.root = root
        self.db = db
        self.writes = writes if writes is not None else SeriesWrites()
        self.incoming = root / INCOMING
        self.incoming.mkdir(parents=True, exist_ok=True)

    def remove_incoming(self) -> int:
        """Remove temporary files a killed listener left behind; returns how many.

        Only the listener writes into the store, so call this before it accepts associations.
        """
        removed = 0
        for leftover in self.incoming.iterdir():
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
                removed += 1
        if removed:
            log.warning("removed %d half-written file(s) left by a previous process", removed)
        return removed

    def relative_path(self, key: InstanceKey) -> Path:
        return (
            Path(_safe_component(key.study_instance_uid))
            / _safe_component(key.series_instance_uid)
            / f"{_safe_component(key.sop_instance_uid)}.dcm"
        )

    def path_of(self, relative: str | Path) -> Path:
        return self.root / relative

    def exists(self, sop_instance_uid: str) -> bool:
        with self.db.session() as session:
            row = session.get(Instance, sop_instance_uid)
            return row is not None and (self.root / row.path).exists()

    def store(
        self, key: InstanceKey, encoded: bytes, dataset: Dataset, calling_ae: str | None
    ) -> StoreOutcome:
        """Write ``encoded`` (a Part 10 file) durably and record it; idempotent per SOP UID.

        Raises StoreWriteError when the file or its row cannot be written; then nothing of this
        instance is left behind.
        """
        with self.writes.writing(key.series_instance_uid):
            return self._store(key, encoded, dataset, calling_ae)

    def _store(
        self, key: InstanceKey, encoded: bytes, dataset: Dataset, calling_ae: str | None
    ) -> StoreOutcome:
        relative = self.relative_path(key)
        final = self.root / relative
        # a stored duplicate has its file at the final path: without one (the usual case) the
        # DB is not asked (one transaction less per instance; bench/ingest.py)
        if final.exists() and self.exists(key.sop_instance_uid):
            self._touch_series(key)
            return StoreOutcome(final, duplicate=True)
        self._write_durably(final, encoded)
        try:
            duplicate = self._record(key, relative, len(encoded), dataset, calling_ae)
        except (SQLAlchemyError, StoreWriteError) as exc:
            # the file must not outlive a failed row: remove it, unless an earlier copy is known
            if not self.exists(key.sop_instance_uid):
                with contextlib.suppress(FileNotFoundError):
                    final.unlink()
            raise StoreWriteError(f"state DB refused the instance row: {exc}") from exc
        if duplicate:
            # the SOP Instance was stored before, maybe under other Study/Series UIDs (another
            # path): the earlier file stays the instance's, the one just written must not remain
            with self.db.session() as session:
                row = session.get(Instance, key.sop_instance_uid)
                known = row.path if row is not None else None
            if known is not None and Path(known) != relative:
                with contextlib.suppress(FileNotFoundError):
                    final.unlink()
                self._touch_series(key)
                return StoreOutcome(self.root / known, duplicate=True)
        return StoreOutcome(final, duplicate=duplicate)

    def _write_durably(self, final: Path, data: bytes) -> None:
        tmp = self.incoming / f"{final.name}.{secrets.token_hex(4)}.tmp"
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            self.incoming.mkdir(exist_ok=True)
            self._write_file(tmp, data)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StoreWriteError(f"cannot write {final.name}: {exc.strerror or exc}") from exc

    def _write_file(self, path: Path, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)

    def _record(
        self,
        key: InstanceKey,
        relative: Path,
        size: int,
        dataset: Dataset,
        calling_ae: str | None,
    ) -> bool:
        # Core statements on a connection, not the ORM session: an instance of a known series is
        # one UPDATE and one INSERT in one transaction (the ORM's get/flush/commit took about a
        # fifth of a C-STORE's time in the ingest profile; docs/BENCHMARKS.md)
        values = {
            "sop_instance_uid": key.sop_instance_uid,
            "sop_class_uid": key.sop_class_uid,
            "series_instance_uid": key.series_instance_uid,
            "study_instance_uid": key.study_instance_uid,
            "instance_number": _int_or_none(dataset.get("InstanceNumber")),
            "transfer_syntax_uid": key.transfer_syntax_uid,
            "path": str(relative),
            "size": size,
            "calling_ae": calling_ae,
        }
        for _ in range(5):
            now = utcnow()
            try:
                with self.db.engine.begin() as connection:
                    # a late instance re-opens a completed series: it is analysed again after
                    # the quiet period, and the new result is a new SR
                    reopened = connection.execute(
                        update(Series)
                        .where(Series.series_instance_uid == key.series_instance_uid)
                        .values(state=SeriesState.RECEIVING, last_instance_at=now)
                    )
                    if not reopened.rowcount:
                        self._insert_study(connection, key, dataset)
                        self._insert_series(connection, key, dataset, calling_ae, now)
                    connection.execute(insert(Instance).values(**values, received_at=now))
                return False
            except IntegrityError:
                # another association inserted the same study, series or instance meanwhile
                with self.db.session() as session:
                    if session.get(Instance, key.sop_instance_uid) is not None:
                        return True  # the same instance arrived concurrently: stored once
        raise StoreWriteError("could not record the instance after repeated conflicts")

    def _insert_study(self, connection: Connection, key: InstanceKey, dataset: Dataset) -> None:
        known = connection.execute(
            select(Study.study_instance_uid).where(
                Study.study_instance_uid == key.study_instance_uid
            )
        ).first()
        if known is None:
            connection.execute(
                insert(Study).values(
                    study_instance_uid=key.study_instance_uid,
                    patient_id=_str_or_none(dataset.get("PatientID")),
                    accession_number=_str_or_none(dataset.get("AccessionNumber")),
                    study_date=_str_or_none(dataset.get("StudyDate")),
                    study_description=_str_or_none(dataset.get("StudyDescription")),
                    created_at=utcnow(),
                )
            )

    def _insert_series(
        self,
        connection: Connection,
        key: InstanceKey,
        dataset: Dataset,
        calling_ae: str | None,
        now: datetime,
    ) -> None:
        connection.execute(
            insert(Series).values(
                series_instance_uid=key.series_instance_uid,
                study_instance_uid=key.study_instance_uid,
                modality=_str_or_none(dataset.get("Modality")),
                calling_ae=calling_ae,
                state=SeriesState.RECEIVING,
                first_instance_at=now,
                last_instance_at=now,
            )
        )

    def _touch_series(self, key: InstanceKey) -> None:
        """A duplicate keeps its series open only while it is still receiving."""
        with self.db.session() as session:
            series = session.get(Series, key.series_instance_uid)
            if series is not None and series.state == SeriesState.RECEIVING:
                series.last_instance_at = utcnow()

    def instances_of_series(self, series_instance_uid: str) -> list[Instance]:
        with self.db.session() as session:
            rows = session.scalars(
                select(Instance)
                .where(Instance.series_instance_uid == series_instance_uid)
                .order_by(Instance.instance_number, Instance.received_at)
            ).all()
            return list(rows)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _str_or_none(value: object) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _int_or_none(value: object) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(str(value))
    except ValueError:
        return None
