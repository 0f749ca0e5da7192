"""Series completion and the resumable queue, driven from the state DB.

One loop in the node process:
- a series quiet for ``series_quiet_seconds`` becomes complete: a job row is written first, and only
  then is the Celery message sent, so a lost message can always be re-sent from the row;
- mammography is analysed per study: the MG series of a study complete together, when none of
  them has received an instance for ``series_quiet_seconds``, or at once when its stored MG
  instances hold the four screening views (L/R x CC/MLO, ``mammo_view_set: four_views``) and
  did not already at its previous completion; one job covers them all (``job_series`` rows),
  keyed by the study's first-received MG series;
- a series of a modality with no analysis pipeline (not in ``analysed_modalities``: CT, SR, KO,
  ...) is complete after the quiet period like any other, but its job row is written already
  ended, with the reason, and no message is sent: it never reaches a model;
- queued jobs whose message is gone (the broker restarted and lost it) are sent again;
- running jobs whose worker vanished are re-queued, or failed after ``job_max_attempts``;
- deliveries that are due (first attempt or a retry after back-off) are sent to a worker.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import exists, func, select, update
from sqlalchemy.orm import Session, aliased

from dicom_node.db import (
    Delivery,
    DeliveryAttempt,
    DeliveryState,
    Instance,
    Job,
    JobSeries,
    JobState,
    Series,
    SeriesState,
    StateDB,
    changed_rows,
    utcnow,
)
from dicom_node.settings import Settings
from dicom_node.store import SeriesWrites
from inference.dicom_pixels import image_laterality, view_position

log = logging.getLogger(__name__)

SendFn = Callable[[int], None]
DepthFn = Callable[[], int | None]

# the four views of a screening mammography study
SCREENING_VIEWS = frozenset({("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")})
_VIEW_CACHE_LIMIT = 20_000


class Dispatcher:
    """Turns DB rows into broker messages; safe to run again after any crash."""

    def __init__(
        self,
        settings: Settings,
        db: StateDB,
        send_job: SendFn,
        send_delivery: SendFn,
        queue_depth: DepthFn | None = None,
        writes: SeriesWrites | None = None,
    ) -> None:
        self.settings = settings
        # the series with an instance being written by this process's listener or STOW-RS
        self.writes = writes if writes is not None else SeriesWrites()
        self.db = db
        self.send_job = send_job
        self.send_delivery = send_delivery
        self.queue_depth = queue_depth
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # SOPInstanceUID -> (laterality, view) of stored MG instances (read once from the file)
        self._views: dict[str, tuple[str | None, str | None]] = {}

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self.recover()
        self._thread = threading.Thread(target=self._run, name="dispatcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self._next_wait()):
            self.tick()

    def _next_wait(self) -> float:
        """``dispatch_interval_seconds``, or less when a receiving series becomes quiet sooner:
        a series is completed when its quiet period ends, not up to one interval later (on
        average half an interval off every turnaround; bench/turnaround.py)."""
        from sqlalchemy import func
        from sqlalchemy.exc import SQLAlchemyError

        interval = self.settings.dispatch_interval_seconds
        try:
            with self.db.session() as session:
                oldest = session.scalar(
                    select(func.min(Series.last_instance_at)).where(
                        Series.state == SeriesState.RECEIVING
                    )
                )
        except SQLAlchemyError:
            return interval
        if oldest is None:
            return interval
        quiet_at = oldest + timedelta(seconds=self.settings.series_quiet_seconds)
        due = (quiet_at - utcnow()).total_seconds()
        # at least 50 ms: a series that is due but could not be completed is not polled hotter
        return min(interval, max(0.05, due + 0.005))

    def tick(self) -> None:
        """One pass of every duty; errors of one pass are logged and retried next pass."""
        from sqlalchemy.exc import SQLAlchemyError

        try:
            self.complete_quiet_series()
            self.send_pending_jobs()
            self.resend_lost_jobs()
            self.recover_lost_deliveries()
            self.send_due_deliveries()
        except SQLAlchemyError as exc:
            log.error("dispatcher pass failed, retrying: %s", exc)
        except OSError as exc:  # broker connection errors surface as OSError subclasses
            log.error("broker unavailable, retrying: %s", exc)

    def recover(self) -> None:
        """At start-up: with the embedded (in-memory) broker every queued message died with the
        previous process, and so did any running task; put them back to pending."""
        if self.settings.distributed:
            return
        with self.db.session() as session:
            requeued = changed_rows(
                session,
                update(Job)
                .where(Job.state.in_([JobState.QUEUED, JobState.RUNNING]))
                .values(state=JobState.PENDING),
            )
            redelivered = changed_rows(
                session,
                update(Delivery)
                .where(Delivery.state == DeliveryState.SENDING)
                .values(state=DeliveryState.PENDING, dispatched_at=None),
            )
            changed_rows(
                session,
                update(Delivery)
                .where(Delivery.state == DeliveryState.PENDING)
                .values(dispatched_at=None),
            )
        if requeued or redelivered:
            log.info(
                "recovered %d job(s) and %d delivery(ies) after restart", requeued, redelivered
            )

    # -- duties ----------------------------------------------------------------------------
    def complete_quiet_series(self) -> list[int]:
        """Complete the quiet series, the quiet mammography studies and those whose view set is
        whole; returns the new job ids."""
        cutoff = utcnow() - timedelta(seconds=self.settings.series_quiet_seconds)
        created: list[int] = []
        with self.db.session() as session:
            quiet = session.execute(
                select(Series.series_instance_uid, Series.study_instance_uid, Series.modality)
                .where(Series.state == SeriesState.RECEIVING, Series.last_instance_at <= cutoff)
            ).all()
        mammo_studies: list[str] = []
        for uid, study, modality in quiet:
            if self._per_study(modality):
                if study not in mammo_studies:
                    mammo_studies.append(study)
                continue
            job_id = self._complete(uid, cutoff, "quiet")
            if job_id is not None:
                created.append(job_id)
        for study in mammo_studies:
            job_id = self._complete_mammo_study(study, cutoff, "quiet")
            if job_id is not None:
                created.append(job_id)
        if self.settings.mammo_view_set == "four_views" and self._per_study("MG"):
            for study in self._whole_mammo_view_sets(cutoff):
                job_id = self._complete_mammo_study(study, None, "mammography view set whole")
                if job_id is not None:
                    created.append(job_id)
        return created

    def _per_study(self, modality: str | None) -> bool:
        """Whether series of ``modality`` are analysed per study (mammography)."""
        value = (modality or "").strip().upper()
        return value == "MG" and value in self.settings.analysed_modalities

    def _complete(self, uid: str, cutoff: datetime | None, why: str) -> int | None:
        """Mark one receiving series complete (still quiet since ``cutoff`` if given) and write
        its job row; None if a new instance re-opened it meanwhile or is being written."""
        with self.db.session() as session:
            conditions = [
                Series.series_instance_uid == uid,
                Series.state == SeriesState.RECEIVING,
            ]
            if uid in self.writes.active():
                return None  # an instance of it is being written: not complete yet
            if cutoff is not None:
                conditions.append(Series.last_instance_at <= cutoff)
            changed = changed_rows(
                session, update(Series).where(*conditions).values(state=SeriesState.COMPLETE)
            )
            if not changed:
                return None  # a new instance arrived meanwhile: still receiving
            series = session.get(Series, uid)
            modality = ((series.modality if series is not None else None) or "").strip().upper()
            count = session.scalar(
                select(func.count()).select_from(Instance).where(
                    Instance.series_instance_uid == uid
                )
            )
            job = Job(series_instance_uid=uid, state=JobState.PENDING, instance_count=count)
            if modality not in self.settings.analysed_modalities:
                job.state = JobState.DONE
                job.reason = (
                    f"not analysed: Modality {modality or '(none)'!r} has no analysis pipeline "
                    f"(analysed: {', '.join(self.settings.analysed_modalities)})"
                )
                job.finished_at = utcnow()
            session.add(job)
            session.flush()
            job_id = job.id
            reason = job.reason
        if reason is not None:
            log.info("series %s stored, job %d: %s", uid, job_id, reason)
        else:
            log.info("series %s complete (%s): job %d", uid, why, job_id)
        return job_id

    def _complete_mammo_study(self, study: str, cutoff: datetime | None, why: str) -> int | None:
        """Complete the receiving MG series of ``study`` together and write one job for all its
        MG series (the unit of mammography analysis is the study).

        With ``cutoff`` (the quiet rule) nothing happens while any MG series of the study has
        received an instance since ``cutoff``: one UPDATE completes the series only if none
        has, so a study is never split by a series still arriving. None when no series was
        completed (a new instance arrived meanwhile, or one is still being written).
        """
        with self.db.session() as session:
            active = self.writes.active()
            if active and active & set(session.scalars(
                select(Series.series_instance_uid).where(
                    Series.study_instance_uid == study, Series.modality == "MG"
                )
            ).all()):
                return None  # an instance of one of its series is being written
            conditions = [
                Series.study_instance_uid == study,
                Series.modality == "MG",
                Series.state == SeriesState.RECEIVING,
            ]
            if cutoff is not None:
                busy = aliased(Series)
                conditions.append(~exists().where(
                    busy.study_instance_uid == study,
                    busy.modality == "MG",
                    busy.state == SeriesState.RECEIVING,
                    busy.last_instance_at > cutoff,
                ))
            changed = changed_rows(
                session,
                update(Series).where(*conditions).values(state=SeriesState.COMPLETE)
                .execution_options(synchronize_session=False),
            )
            if not changed:
                return None
            job_id, members, count = self._study_job(session, study)
        log.info("mammography study %s complete (%s): job %d over %d series, %d instance(s)",
                 study, why, job_id, len(members), count)
        return job_id

    @staticmethod
    def _study_job(session: Session, study: str) -> tuple[int, list[str], int]:
        """The job of a completed mammography study over all its completed MG series, keyed by
        the first-received one (stable: a later series is never received earlier)."""
        members = list(session.scalars(
            select(Series.series_instance_uid)
            .where(
                Series.study_instance_uid == study,
                Series.modality == "MG",
                Series.state == SeriesState.COMPLETE,
            )
            .order_by(Series.first_instance_at, Series.series_instance_uid)
        ).all())
        count = session.scalar(
            select(func.count()).select_from(Instance).where(
                Instance.series_instance_uid.in_(members)
            )
        ) or 0
        job = Job(series_instance_uid=members[0], state=JobState.PENDING, instance_count=count)
        session.add(job)
        session.flush()
        session.add_all(JobSeries(job_id=job.id, series_instance_uid=uid) for uid in members)
        return job.id, members, count

    def _whole_mammo_view_sets(self, cutoff: datetime) -> list[str]:
        """Studies with a receiving MG series (not yet quiet) whose stored MG instances hold
        the four screening views."""
        with self.db.session() as session:
            studies = set(session.scalars(
                select(Series.study_instance_uid).where(
                    Series.state == SeriesState.RECEIVING,
                    Series.modality == "MG",
                    Series.last_instance_at > cutoff,
                )
            ).all())
            if not studies:
                return []
            instances = session.execute(
                select(Instance.sop_instance_uid, Instance.study_instance_uid, Instance.path,
                       Instance.received_at)
                .join(Series, Series.series_instance_uid == Instance.series_instance_uid)
                .where(Instance.study_instance_uid.in_(studies), Series.modality == "MG")
            ).all()
            # when each study's latest mammography job was made
            last_job = dict(session.execute(
                select(Series.study_instance_uid, func.max(Job.created_at))
                .join(JobSeries, JobSeries.series_instance_uid == Series.series_instance_uid)
                .join(Job, Job.id == JobSeries.job_id)
                .where(Series.study_instance_uid.in_(studies))
                .group_by(Series.study_instance_uid)
            ).all())
        if len(self._views) > _VIEW_CACHE_LIMIT:
            self._views.clear()
        views: dict[str, set[tuple[str | None, str | None]]] = {}
        before: dict[str, set[tuple[str | None, str | None]]] = {}
        for sop_uid, study, path, received_at in instances:
            if sop_uid not in self._views:
                self._views[sop_uid] = self._read_view(path)
            views.setdefault(study, set()).add(self._views[sop_uid])
            if study in last_job and received_at <= last_job[study]:
                before.setdefault(study, set()).add(self._views[sop_uid])
        # a view set already whole at the study's last completion does not complete it again
        # at once: images after it (an extra view, a repeat) wait for the quiet period
        return sorted(
            study for study, seen in views.items()
            if seen >= SCREENING_VIEWS and not before.get(study, set()) >= SCREENING_VIEWS
        )

    def _read_view(self, path: str) -> tuple[str | None, str | None]:
        try:
            ds = dcmread(
                self.settings.store_dir / path,
                stop_before_pixels=True,
                specific_tags=[
                    "ImageLaterality", "Laterality", "ViewPosition", "ViewCodeSequence",
                    "PatientOrientation",
                ],
            )
        except (OSError, InvalidDicomError) as exc:
            log.warning("cannot read the view of stored instance %s: %s", path, exc)
            return None, None
        return image_laterality(ds), view_position(ds)

    def send_pending_jobs(self) -> None:
        with self.db.session() as session:
            pending = session.scalars(
                select(Job.id).where(Job.state == JobState.PENDING).order_by(Job.id)
            ).all()
        for job_id in pending:
            self._send_job(job_id, from_states=(JobState.PENDING,))

    def _send_job(self, job_id: int, from_states: tuple[JobState, ...]) -> None:
        # the row is marked queued before the message leaves, so a crash in between leaves a
        # queued job with no message, which resend_lost_jobs picks up
        with self.db.session() as session:
            changed = changed_rows(
                session,
                update(Job)
                .where(Job.id == job_id, Job.state.in_(from_states))
                .values(state=JobState.QUEUED, sent_at=utcnow()),
            )
        if changed:
            self.send_job(job_id)

    def resend_lost_jobs(self) -> None:
        now = utcnow()
        stale_sent = now - timedelta(seconds=self.settings.job_resend_seconds)
        stale_running = now - timedelta(seconds=self.settings.job_timeout_seconds)
        with self.db.session() as session:
            lost_running = session.scalars(
                select(Job).where(Job.state == JobState.RUNNING, Job.started_at <= stale_running)
            ).all()
            for job in lost_running:
                if job.attempts >= self.settings.job_max_attempts:
                    job.state = JobState.FAILED
                    job.reason = (
                        f"analysis did not finish in {self.settings.job_timeout_seconds:.0f} s "
                        f"on any of {job.attempts} attempts (worker lost)"
                    )
                    job.finished_at = now
                    log.error("job %d failed: %s", job.id, job.reason)
                else:
                    job.state = JobState.PENDING
                    log.warning("job %d: worker lost, re-queued", job.id)
            waiting = session.scalars(
                select(Job.id).where(Job.state == JobState.QUEUED, Job.sent_at <= stale_sent)
            ).all()
        if not waiting:
            return
        depth = self.queue_depth() if self.queue_depth is not None else None
        if depth is not None and depth > 0:
            return  # messages are still waiting in the broker: nothing was lost
        for job_id in waiting:
            log.warning("job %d: its message was lost, sending it again", job_id)
            self._send_job(job_id, from_states=(JobState.QUEUED,))

    def recover_lost_deliveries(self) -> None:
        """A delivery ``sending`` for longer than ``job_timeout_seconds`` lost its worker (killed
        mid-send): its attempt counts as failed; it is due again, or failed after
        ``delivery_max_attempts``. (The embedded layout also does this at start-up.)"""
        now = utcnow()
        stale = now - timedelta(seconds=self.settings.job_timeout_seconds)
        reason = (
            f"no outcome after {self.settings.job_timeout_seconds:.0f} s: "
            "the sending worker was lost"
        )
        with self.db.session() as session:
            lost = session.scalars(
                select(Delivery).where(
                    Delivery.state == DeliveryState.SENDING, Delivery.updated_at <= stale
                )
            ).all()
            for delivery in lost:
                changed_rows(
                    session,
                    update(DeliveryAttempt)
                    .where(
                        DeliveryAttempt.delivery_id == delivery.id,
                        DeliveryAttempt.finished_at.is_(None),
                    )
                    .values(finished_at=now, ok=False, error=reason),
                )
                delivery.last_error = reason
                delivery.updated_at = now
                if delivery.attempts >= self.settings.delivery_max_attempts:
                    delivery.state = DeliveryState.FAILED
                    log.error("delivery %d failed for good: %s", delivery.id, reason)
                else:
                    delivery.state = DeliveryState.PENDING
                    delivery.next_attempt_at = now
                    delivery.dispatched_at = None
                    log.warning("delivery %d: %s; sending it again", delivery.id, reason)

    def send_due_deliveries(self) -> None:
        now = utcnow()
        redispatch = now - timedelta(seconds=self.settings.job_resend_seconds)
        with self.db.session() as session:
            due = session.scalars(
                select(Delivery.id).where(
                    Delivery.state == DeliveryState.PENDING,
                    Delivery.next_attempt_at <= now,
                    (Delivery.dispatched_at.is_(None)) | (Delivery.dispatched_at <= redispatch),
                )
            ).all()
            for delivery_id in due:
                changed_rows(
                    session,
                    update(Delivery).where(Delivery.id == delivery_id).values(dispatched_at=now),
                )
        for delivery_id in due:
            self.send_delivery(delivery_id)


def retry_delivery(db: StateDB, delivery_id: int) -> bool:
    """Make a failed (or waiting) delivery due now, with a fresh round of attempts."""
    now = utcnow()
    with db.session() as session:
        changed = changed_rows(
            session,
            update(Delivery)
            .where(
                Delivery.id == delivery_id,
                Delivery.state.in_([DeliveryState.FAILED, DeliveryState.PENDING]),
            )
            .values(
                state=DeliveryState.PENDING,
                attempts=0,
                next_attempt_at=now,
                dispatched_at=None,
                updated_at=now,
            ),
        )
    return bool(changed)
