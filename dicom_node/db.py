"""The state DB: every instance, series, job, result and delivery is a row with a state.

SQLite under ``data_dir`` in the embedded layout, PostgreSQL when distributed. Processes that
resume after a crash (the dispatcher, workers, the API) read these rows, never in-memory state.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from sqlalchemy import (
    JSON,
    Boolean,
    CursorResult,
    DateTime,
    Engine,
    Executable,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    create_engine,
    event,
    make_url,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class SeriesState(enum.StrEnum):
    RECEIVING = "receiving"  # instances arriving; complete after the quiet period
    COMPLETE = "complete"  # a job row exists for the instances received so far


class JobState(enum.StrEnum):
    PENDING = "pending"  # row written, message not yet sent
    QUEUED = "queued"  # message sent to the broker
    RUNNING = "running"  # a worker claimed it
    DONE = "done"
    FAILED = "failed"


class DeliveryState(enum.StrEnum):
    PENDING = "pending"  # waiting for its (next) attempt
    SENDING = "sending"  # a worker is sending it
    DONE = "done"
    FAILED = "failed"  # attempts exhausted; a retry (API or CLI) makes it pending again


class Study(Base):
    __tablename__ = "studies"

    study_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    accession_number: Mapped[str | None] = mapped_column(String(64))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_description: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Series(Base):
    __tablename__ = "series"

    series_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(
        String(64), ForeignKey("studies.study_instance_uid"), index=True
    )
    modality: Mapped[str | None] = mapped_column(String(16))
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default=SeriesState.RECEIVING, index=True)
    first_instance_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_instance_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)


class Instance(Base):
    __tablename__ = "instances"

    sop_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str] = mapped_column(
        String(64), ForeignKey("series.series_instance_uid"), index=True
    )
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)  # relative to the instance store
    size: Mapped[int] = mapped_column(Integer)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    series_instance_uid: Mapped[str] = mapped_column(
        String(64), ForeignKey("series.series_instance_uid"), index=True
    )
    state: Mapped[str] = mapped_column(String(16), default=JobState.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    reason: Mapped[str | None] = mapped_column(Text)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)


class JobSeries(Base):
    """The series a job analyses when it is more than its own (a mammography study: every MG
    series of the study, ``jobs.series_instance_uid`` being its first-received one).

    A job without rows here analyses its own series. An additive table: ``create_all`` makes it
    in a state DB created before it, whose jobs all are per series.
    """

    __tablename__ = "job_series"

    job_id: Mapped[int] = mapped_column(Integer, ForeignKey("jobs.id"), primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(
        String(64), ForeignKey("series.series_instance_uid"), primary_key=True, index=True
    )


class Result(Base):
    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(Integer, ForeignKey("jobs.id"), unique=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    modality: Mapped[str] = mapped_column(String(16))
    label: Mapped[str] = mapped_column(String(32))
    probability: Mapped[float] = mapped_column(Float)
    probabilities: Mapped[dict[str, float]] = mapped_column(JSON)
    not_assessable: Mapped[bool] = mapped_column(default=False)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(32))
    model_sha256: Mapped[str] = mapped_column(String(64))
    sr_sop_instance_uid: Mapped[str] = mapped_column(String(64))
    # probability of malignancy (reports.triage.suspicion); null when the labels have none
    suspicion: Mapped[float | None] = mapped_column(Float)
    # suspicion >= priority_threshold when the result was made (also in the SR)
    priority: Mapped[bool] = mapped_column(default=False)
    # the earlier result of the same series (a mammography study: of the same study) this one
    # supersedes (its SR is the predecessor)
    predecessor_id: Mapped[int | None] = mapped_column(Integer, ForeignKey("results.id"))
    # model + Grad-CAM time over the series' images
    inference_seconds: Mapped[float | None] = mapped_column(Float)
    # paths relative to the results dir: the SR, the SC heatmaps and the PNG heatmaps
    files: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Delivery(Base):
    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    result_id: Mapped[int] = mapped_column(Integer, ForeignKey("results.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    # send the result's source instances too (a route with forward_source: true)
    forward_source: Mapped[bool] = mapped_column(default=False)
    state: Mapped[str] = mapped_column(String(16), default=DeliveryState.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    dispatched_at: Mapped[datetime | None] = mapped_column(DateTime)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class DeliveryAttempt(Base):
    __tablename__ = "delivery_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[int] = mapped_column(Integer, ForeignKey("deliveries.id"), index=True)
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    ok: Mapped[bool] = mapped_column(default=False)
    error: Mapped[str | None] = mapped_column(Text)


class CaseEmbedding(Base):
    """One analysed image's embedding (penultimate layer), for similar-case retrieval."""

    __tablename__ = "case_embeddings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    result_id: Mapped[int] = mapped_column(Integer, ForeignKey("results.id"), index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    # 1-based index of the image in its result (its heatmap is /results/{id}/heatmap.png?index=)
    image_index: Mapped[int] = mapped_column(Integer)
    # the model that made the embedding: only embeddings of the same model are comparable
    model_key: Mapped[str] = mapped_column(String(160), index=True)
    label: Mapped[str] = mapped_column(String(32))
    # the confirmed diagnosis when known (e.g. a data set's label, pathology), else null
    ground_truth: Mapped[str | None] = mapped_column(String(32))
    # float32 little-endian, L2-normalised
    embedding: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class AuditEvent(Base):
    """Who did what, when, to which objects: associations, C-STOREs, API actions."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    # "dicom" (the calling AE title) or "api" (the client address)
    actor_kind: Mapped[str] = mapped_column(String(8))
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(32), index=True)
    ok: Mapped[bool] = mapped_column(Boolean, default=True)
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(Text)


class StateDB:
    """Engine and sessions for the state DB; creates the tables on first use."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {"future": True}
        if self.is_sqlite:
            database = make_url(url).database
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs["pool_pre_ping"] = True
        self.engine: Engine = create_engine(url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        if self.is_sqlite:
            Base.metadata.create_all(self.engine)
        else:
            # node and workers starting together on a fresh database would race in CREATE TABLE
            # (a UniqueViolation killed a worker at start-up): one creates, the others wait
            with self.engine.begin() as connection:
                connection.execute(text("SELECT pg_advisory_xact_lock(724011)"))
                Base.metadata.create_all(connection)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed when the block ends, rolled back if it raises."""
        with self._sessions.begin() as session:
            yield session

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def changed_rows(session: Session, statement: Executable) -> int:
    """Execute an UPDATE/DELETE and return how many rows it changed (the claim idiom)."""
    result = cast("CursorResult[Any]", session.execute(statement))
    return int(result.rowcount)
