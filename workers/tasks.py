"""The work a Celery worker does: analyse a completed series, deliver a result.

Both tasks are idempotent: each first claims its row with a conditional UPDATE, so a message that
arrives twice (a re-sent job, a redelivered task) does the work once; results have deterministic
UIDs, so a retried analysis produces the same SR and SC.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import ColumnElement, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from dicom_node import similar
from dicom_node.api import report_facts
from dicom_node.db import (
    CaseEmbedding,
    Delivery,
    DeliveryAttempt,
    DeliveryState,
    Instance,
    Job,
    JobSeries,
    JobState,
    Result,
    Series,
    StateDB,
    Study,
    changed_rows,
    utcnow,
)
from dicom_node.fhir_push import FHIR_DESTINATION, FhirPushError, push_report
from dicom_node.scu import DeliveryError, send_files
from dicom_node.settings import DicomwebDestination, Settings
from dicom_node.stow_client import stow_files
from inference import (
    Classifier,
    ModelNotAvailableError,
    Prediction,
    load_bundled,
    number_of_frames,
)
from inference.dicom_pixels import image_laterality
from inference.stages import recording, stage
from reports import build_results, overlay_png
from reports.fhir import diagnostic_report
from reports.sr import SimilarCase
from reports.triage import is_priority, suspicion
from workers import mammo, ultrasound
from workers.analysis import (
    ImageAnalysis,
    PipelineError,
    Predictor,
    SeriesAnalysis,
    aggregate,
    analyse_generic,
)
from workers.routing import ResultFacts, route
from workers.slide import SlidePipelineError, analyse_slide_series

__all__ = ["AnalysisFailed", "WorkerContext", "aggregate", "analyse", "analyse_instance", "deliver",
           "run_pipeline"]

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"

log = logging.getLogger(__name__)

SOFTWARE_VERSION = "0.1.0"


class AnalysisFailed(RuntimeError):
    """The series cannot be analysed; the reason is stored on the job row."""


@dataclass
class WorkerContext:
    """What the tasks of one worker process share: settings, the DB, loaded models."""

    settings: Settings
    db: StateDB

    def __post_init__(self) -> None:
        self._models: dict[str, Classifier] = {}
        self._lock = threading.Lock()

    def classifier(self, modality: str) -> Classifier:
        """The model of ``modality``: from the first of ``model_dirs`` that has one, else the
        bundled one; ModelNotAvailableError when there is none."""
        with self._lock:
            if modality not in self._models:
                self._models[modality] = self._load(modality)
            return self._models[modality]

    def _load(self, modality: str) -> Classifier:
        return self._find(modality).with_backend(self.settings.inference_backend)

    def _find(self, modality: str) -> Classifier:
        for directory in self.settings.model_dirs:
            try:
                return load_bundled(modality, directory)
            except ModelNotAvailableError:
                continue
        return load_bundled(modality)


# -- analysis -------------------------------------------------------------------------------


def analyse(ctx: WorkerContext, job_id: int) -> str:
    """Analyse the series of job ``job_id``; returns the job's final state."""
    now = utcnow()
    with ctx.db.session() as session:
        claimed = changed_rows(
            session,
            update(Job)
            .where(Job.id == job_id, Job.state.in_([JobState.PENDING, JobState.QUEUED]))
            .values(state=JobState.RUNNING, attempts=Job.attempts + 1, started_at=now),
        )
        job = session.get(Job, job_id)
    if not claimed or job is None:
        log.info("job %s already taken or finished; message ignored", job_id)
        return job.state if job is not None else "missing"
    if job.attempts > ctx.settings.job_max_attempts:
        return _finish_job(
            ctx, job_id, JobState.FAILED, f"gave up after {job.attempts - 1} attempts"
        )
    try:
        with _heartbeat(ctx, job_id), recording() as timings:
            result_id, delivery_ids = _analyse_series(ctx, job, timings)
    except AnalysisFailed as exc:
        log.warning("job %d failed: %s", job_id, exc)
        return _finish_job(ctx, job_id, JobState.FAILED, str(exc))
    except IntegrityError:
        # the job was re-queued while this attempt ran (it outlived job_timeout_seconds) and the
        # other attempt stored the result first (results.job_id is unique): same result, done
        log.warning("job %d: another attempt already stored its result", job_id)
        return JobState.DONE
    except Exception as exc:  # noqa: BLE001 - the task boundary: any error becomes the job's reason
        log.exception("job %d: unexpected error", job_id)
        if job.attempts < ctx.settings.job_max_attempts:
            with ctx.db.session() as session:
                changed_rows(
                    session,
                    update(Job)
                    .where(Job.id == job_id, Job.state == JobState.RUNNING)
                    .values(state=JobState.PENDING, reason=f"{type(exc).__name__}: {exc}"),
                )
            return JobState.PENDING
        return _finish_job(ctx, job_id, JobState.FAILED, f"{type(exc).__name__}: {exc}")
    log.info("job %d done: result %d, %d delivery(ies)", job_id, result_id, len(delivery_ids))
    # The first attempt runs here, at once: queued behind other analyses it would wait for all of
    # them (measured: p50 80 s instead of seconds for a burst of 50 series). Retries go through
    # the queue, scheduled by the dispatcher.
    for delivery_id in delivery_ids:
        deliver(ctx, delivery_id)
    return JobState.DONE


@contextmanager
def _heartbeat(ctx: WorkerContext, job_id: int) -> Iterator[None]:
    """Renew the running job's lease (``started_at``) while this attempt is alive.

    The dispatcher re-queues a running job whose lease is older than ``job_timeout_seconds``: with
    the lease renewed every eighth of that, only a job whose worker died (or stalled for 7/8 of
    the lease) is taken back, however long its analysis takes.
    """
    stop = threading.Event()
    interval = max(0.1, ctx.settings.job_timeout_seconds / 8)

    def renew() -> None:
        while not stop.wait(interval):
            try:
                with ctx.db.session() as session:
                    session.execute(
                        update(Job)
                        .where(Job.id == job_id, Job.state == JobState.RUNNING)
                        .values(started_at=utcnow())
                    )
            except SQLAlchemyError as exc:
                log.warning("job %d: cannot renew its lease: %s", job_id, exc)

    thread = threading.Thread(target=renew, name=f"heartbeat-{job_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


def _finish_job(ctx: WorkerContext, job_id: int, state: JobState, reason: str | None) -> str:
    """End a running job; a job another attempt already finished keeps its state."""
    with ctx.db.session() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.RUNNING)
            .values(state=state, reason=reason, finished_at=utcnow())
        )
    return state


def _job_series(ctx: WorkerContext, job: Job) -> tuple[list[str], bool]:
    """The series job ``job`` analyses, and whether it is a study job: those of its
    ``job_series`` rows (a mammography study, first-received series first), else its own."""
    with ctx.db.session() as session:
        members = session.scalars(
            select(JobSeries.series_instance_uid)
            .join(Series, Series.series_instance_uid == JobSeries.series_instance_uid)
            .where(JobSeries.job_id == job.id)
            .order_by(Series.first_instance_at, Series.series_instance_uid)
        ).all()
    return (list(members), True) if members else ([job.series_instance_uid], False)


def _load_datasets(
    ctx: WorkerContext, job: Job, series_uids: Sequence[str]
) -> tuple[list[Dataset], Series, list[str]]:
    """The stored instances of the job's series (in that order), the job's own series row, and
    the instances' paths in the instance store."""
    with ctx.db.session() as session:
        series = session.get(Series, job.series_instance_uid)
        rows: list[Instance] = []
        for uid in series_uids:
            rows += session.scalars(
                select(Instance)
                .where(Instance.series_instance_uid == uid)
                .order_by(Instance.instance_number, Instance.received_at)
            ).all()
    if series is None or not rows:
        raise AnalysisFailed(f"series {', '.join(series_uids)} has no stored instances")
    datasets: list[Dataset] = []
    for row in rows:
        path = ctx.settings.store_dir / row.path
        try:
            # pixel data is read when decoded (a whole-slide pyramid is never loaded whole)
            datasets.append(dcmread(path, defer_size="1 MB"))
        except (OSError, InvalidDicomError) as exc:
            raise AnalysisFailed(
                f"cannot read stored instance {row.sop_instance_uid}: {exc}"
            ) from exc
    return datasets, series, [row.path for row in rows]


def _predecessor(
    ctx: WorkerContext,
    job: Job,
    per_study: bool,
    sop_uids: set[str],
    prediction: Prediction,
) -> tuple[int, Dataset] | None:
    """The latest earlier result of the job's series (``per_study``: the latest mammography
    result of its study, whichever series it was keyed by) that this one supersedes, as an SR
    reference.

    None when there is none, or when it was made from the same instances by the same model
    (then the new SR has the same UIDs: it is the same result made again, not a new one).
    """
    scope: ColumnElement[bool]
    with ctx.db.session() as session:
        if per_study:
            study = session.scalar(
                select(Series.study_instance_uid)
                .where(Series.series_instance_uid == job.series_instance_uid)
            )
            scope = (Result.study_instance_uid == study) & (Result.modality == "MG")
        else:
            scope = Result.series_instance_uid == job.series_instance_uid
        previous = session.scalars(
            select(Result).where(scope, Result.job_id != job.id)
            .order_by(Result.id.desc()).limit(1)
        ).first()
    if previous is None:
        return None
    same_sources = {p["sop_instance_uid"] for p in previous.files.get("per_image", [])}
    same_model = (previous.model_name, previous.model_version, previous.model_sha256) == (
        prediction.model_name,
        prediction.model_version,
        prediction.model_sha256,
    )
    if same_model and same_sources == sop_uids:
        return None
    sr_series = previous.files.get("sr_series_instance_uid")
    if not sr_series:
        return None
    reference = Dataset()
    reference.StudyInstanceUID = previous.study_instance_uid
    reference.SeriesInstanceUID = sr_series
    reference.SOPClassUID = COMPREHENSIVE_3D_SR
    reference.SOPInstanceUID = previous.sr_sop_instance_uid
    return previous.id, reference


def _laterality(ds: Dataset) -> str | None:
    """'L' or 'R' from ImageLaterality, else Laterality; None when unknown."""
    return image_laterality(ds)


def run_pipeline(
    ctx: WorkerContext, modality: str, datasets: Sequence[Dataset], classifier: Predictor
) -> SeriesAnalysis:
    """The modality's pipeline (one branch per modality; the generic one for the rest)."""
    if modality == "MG":
        return mammo.analyse_series(datasets, classifier, ctx.settings.mg_max_side)
    if modality == "US":
        return ultrasound.analyse_series(datasets, classifier, ctx.settings.us_max_frames)
    return analyse_generic(datasets, classifier)


def analyse_instance(
    ds: Dataset, classifier: Predictor, us_max_frames: int, mg_max_side: int | None = None
) -> ImageAnalysis:
    """One instance through its modality's per-image pipeline (``breastcad predict``); raises
    PipelineError with the reason."""
    modality = str(ds.get("Modality", "")).strip().upper()
    if modality == "MG":
        return mammo.analyse_instance(ds, classifier, mg_max_side)
    if modality == "US":
        return ultrasound.analyse_instance(ds, classifier, us_max_frames)
    return analyse_generic([ds], classifier).analyses[0]


def _images_only(datasets: list[Dataset], paths: list[str]) -> tuple[list[Dataset], list[str]]:
    """The instances with pixel data; the others (a KOS or an SR filed in an image series) are
    stored, logged and left out."""
    kept = [(ds, path) for ds, path in zip(datasets, paths, strict=True) if number_of_frames(ds)]
    for ds in datasets:
        if not number_of_frames(ds):
            log.info("instance %s (SOP class %s) has no pixel data: not analysed",
                     ds.get("SOPInstanceUID"), ds.get("SOPClassUID"))
    if not kept:
        classes = sorted({str(ds.get("SOPClassUID")) for ds in datasets})
        raise AnalysisFailed(
            f"the series holds no image (no PixelData in its {len(datasets)} instance(s) of "
            f"SOP class {', '.join(classes)}): nothing to analyse"
        )
    return [ds for ds, _ in kept], [path for _, path in kept]


def _analyse_series(
    ctx: WorkerContext, job: Job, timings: dict[str, float]
) -> tuple[int, list[int]]:
    """``timings``: the seconds of the stages so far (inference.stages), stored with the
    result (``files["timings"]``) for the turnaround breakdown."""
    with stage("load"):
        # a mammography study job (job_series rows) covers every MG series of its study
        series_uids, per_study = _job_series(ctx, job)
        datasets, series, source_paths = _load_datasets(ctx, job, series_uids)
    modality = str(datasets[0].get("Modality", "")).strip() or (series.modality or "")
    if modality.upper() not in ctx.settings.analysed_modalities:
        raise AnalysisFailed(
            f"Modality {modality!r} has no analysis pipeline (analysed: "
            f"{', '.join(ctx.settings.analysed_modalities)}): stored, not analysed"
        )
    datasets, source_paths = _images_only(datasets, source_paths)
    try:
        classifier = ctx.classifier(modality)
    except ModelNotAvailableError as exc:
        raise AnalysisFailed(str(exc)) from exc
    started = time.perf_counter()
    if modality.upper() == "SM":  # whole slides: the pyramid is read region by region
        try:
            slide = analyse_slide_series(datasets, classifier)
        except SlidePipelineError as exc:
            raise AnalysisFailed(str(exc)) from exc
        datasets = [slide.source]
        analysis = SeriesAnalysis(
            analyses=[ImageAnalysis(source=slide.source, image=slide.image,
                                    prediction=slide.prediction)],
            series_prediction=slide.prediction,
        )
    else:
        try:
            analysis = run_pipeline(ctx, modality, datasets, classifier)
        except PipelineError as exc:
            raise AnalysisFailed(str(exc)) from exc
    inference_seconds = time.perf_counter() - started
    series_prediction = analysis.series_prediction
    images = [a.image for a in analysis.analyses]
    predictions = [a.prediction for a in analysis.analyses]
    frame_numbers = [a.frame_number for a in analysis.analyses]
    suspicious = suspicion(series_prediction.probabilities)
    priority = is_priority(suspicious, ctx.settings.priority_threshold)
    with stage("similar"):
        predecessor = _predecessor(
            ctx,
            job,
            per_study,
            {str(ds.SOPInstanceUID) for ds in datasets},
            series_prediction,
        )
        similar_cases = _similar_cases(ctx, datasets[0], predictions)
    with stage("build"):
        objects = build_results(
            datasets,
            images,
            predictions,
            series_prediction=series_prediction,
            software_version=SOFTWARE_VERSION,
            priority=priority,
            predecessor=predecessor[1] if predecessor is not None else None,
            groups=analysis.groups,
            frame_numbers=frame_numbers if any(n is not None for n in frame_numbers) else None,
            similar_cases=similar_cases,
            with_seg=_wants_seg(ctx, modality),
        )
    with stage("save"):
        folder = Path(f"job-{job.id}")
        out = ctx.settings.results_dir / folder
        out.mkdir(parents=True, exist_ok=True)
        sr_name = folder / "sr.dcm"
        objects.sr.save_as(ctx.settings.results_dir / sr_name, enforce_file_format=True)
        sc_names: list[str] = []
        png_names: list[str] = []
        for index, (sc, image, prediction) in enumerate(
            zip(objects.heatmaps, images, predictions, strict=True), start=1
        ):
            sc_name = folder / f"sc-{index}.dcm"
            sc.save_as(ctx.settings.results_dir / sc_name, enforce_file_format=True)
            png_name = folder / f"heatmap-{index}.png"
            (ctx.settings.results_dir / png_name).write_bytes(overlay_png(image, prediction))
            sc_names.append(str(sc_name))
            png_names.append(str(png_name))
        seg_names = _save_segmentations(ctx, folder, objects.segmentations)

    facts = ResultFacts(
        modality=modality,
        calling_ae=series.calling_ae,
        label=series_prediction.label,
        probabilities=series_prediction.probabilities,
        not_assessable=series_prediction.not_assessable,
    )
    decision = route(ctx.settings.routes, facts)
    now = utcnow()
    with ctx.db.session() as session:
        result = Result(
            job_id=job.id,
            series_instance_uid=job.series_instance_uid,
            study_instance_uid=str(datasets[0].StudyInstanceUID),
            modality=modality,
            label=series_prediction.label,
            probability=series_prediction.probability,
            probabilities=dict(series_prediction.probabilities),
            not_assessable=series_prediction.not_assessable,
            model_name=series_prediction.model_name,
            model_version=series_prediction.model_version,
            model_sha256=series_prediction.model_sha256,
            sr_sop_instance_uid=str(objects.sr.SOPInstanceUID),
            suspicion=suspicious,
            priority=priority,
            predecessor_id=predecessor[0] if predecessor is not None else None,
            inference_seconds=inference_seconds,
            files={
                "sr": str(sr_name),
                "sr_series_instance_uid": str(objects.sr.SeriesInstanceUID),
                # the analysed instances, relative to the instance store (forward_source)
                "sources": source_paths,
                "sc": sc_names,
                "seg": seg_names,
                "png": png_names,
                "per_image": [
                    {
                        "sop_instance_uid": str(a.source.SOPInstanceUID),
                        "series_instance_uid": str(a.source.SeriesInstanceUID),
                        "label": a.prediction.label,
                        "probabilities": dict(a.prediction.probabilities),
                        "laterality": _laterality(a.source),
                        "frame_number": a.frame_number,
                        **a.details,
                    }
                    for a in analysis.analyses
                ],
                "groups": analysis.group_details,
                "timings": {name: round(value, 4) for name, value in timings.items()},
            },
        )
        session.add(result)
        session.flush()
        session.add_all(_embedding_rows(result, datasets, predictions))
        deliveries = [
            Delivery(
                result_id=result.id,
                destination=name,
                forward_source=name in decision.forward_source,
                state=DeliveryState.PENDING,
                next_attempt_at=now,
                dispatched_at=now,
            )
            for name in decision.destinations
        ]
        if ctx.settings.fhir_endpoint is not None:
            deliveries.append(_fhir_delivery(result.id, now))
        session.add_all(deliveries)
        session.flush()
        session.execute(
            update(Job)
            .where(Job.id == job.id)
            .values(state=JobState.DONE, reason=None, finished_at=now)
        )
        return result.id, [d.id for d in deliveries]


def _fhir_delivery(result_id: int, now: datetime) -> Delivery:
    """The delivery row of the FHIR push of a result (retried like a DICOM delivery)."""
    return Delivery(
        result_id=result_id,
        destination=FHIR_DESTINATION,
        forward_source=False,
        state=DeliveryState.PENDING,
        next_attempt_at=now,
        dispatched_at=now,
    )


def _push_fhir(ctx: WorkerContext, result: Result) -> str | None:
    """POST the result's DiagnosticReport to the FHIR endpoint; the error, or None."""
    endpoint = ctx.settings.fhir_endpoint
    if endpoint is None:
        return "the FHIR endpoint is no longer configured"
    with ctx.db.session() as session:
        study = session.get(Study, result.study_instance_uid)
    base = endpoint.node_base_url or f"http://{ctx.settings.api_host}:{ctx.settings.api_port}"
    report = diagnostic_report(report_facts(result, study, base.rstrip("/")))
    try:
        location = push_report(endpoint, report)
    except FhirPushError as exc:
        return str(exc)
    log.info("result %d: DiagnosticReport pushed to the FHIR server (%s)", result.id,
             location or "no Location")
    return None


def _wants_seg(ctx: WorkerContext, modality: str) -> bool:
    """Build heatmap Segmentations when a destination takes them (not for slides)."""
    return modality != "SM" and any(
        "seg" in destination.objects for destination in ctx.settings.destinations.values()
    )


def _save_segmentations(
    ctx: WorkerContext, folder: Path, segmentations: Sequence[Dataset]
) -> list[str]:
    names: list[str] = []
    for index, seg in enumerate(segmentations, start=1):
        name = folder / f"seg-{index}.dcm"
        seg.save_as(ctx.settings.results_dir / name, enforce_file_format=True)
        names.append(str(name))
    return names


def _result_files(ctx: WorkerContext, result: Result, objects: Sequence[str]) -> list[Path]:
    """The result's files of the kinds a destination takes (SR first, then SCs, then SEGs)."""
    names: list[str] = []
    if "sr" in objects:
        names.append(result.files["sr"])
    if "sc" in objects:
        names += result.files["sc"]
    if "seg" in objects:
        if not result.files.get("seg"):
            log.warning("result %d has no heatmap SEG (made before a destination asked for "
                        "one, or a slide); sending the rest", result.id)
        names += result.files.get("seg", [])
    return [ctx.settings.results_dir / name for name in names]


def _similar_cases(
    ctx: WorkerContext, first: Dataset, predictions: Sequence[Prediction]
) -> list[SimilarCase]:
    """The nearest past cases of other studies (same model) that the SR lists."""
    if ctx.settings.similar_cases_in_sr == 0:
        return []
    try:
        query = similar.query_vector(p.embedding for p in predictions)
    except ValueError as exc:
        log.warning("no similar cases for series %s: %s", first.SeriesInstanceUID, exc)
        return []
    key = similar.model_key(predictions[0].model_name, predictions[0].model_sha256)
    found = similar.nearest(
        ctx.db, query, key, k=ctx.settings.similar_cases_in_sr,
        exclude_study=str(first.StudyInstanceUID),
    )
    return [SimilarCase(n.study_instance_uid, n.label, n.distance) for n in found]


def _embedding_rows(
    result: Result, datasets: Sequence[Dataset], predictions: Sequence[Prediction]
) -> list[CaseEmbedding]:
    """The analysed images' embeddings for the similar-case index (images with a usable one)."""
    images = [
        (index, str(ds.SOPInstanceUID), p.label, p.embedding)
        for index, (ds, p) in enumerate(zip(datasets, predictions, strict=True), start=1)
    ]
    usable = [image for image in images if np.all(np.isfinite(image[3])) and np.any(image[3])]
    if len(usable) != len(images):
        log.warning("result %d: %d image(s) without a usable embedding are not indexed",
                    result.id, len(images) - len(usable))
    # each image under its own series (a mammography study's images come from several)
    series_of = {str(ds.SOPInstanceUID): str(ds.SeriesInstanceUID) for ds in datasets}
    by_series: dict[str, list[tuple[int, str, str, np.ndarray]]] = {}
    for image in usable:
        by_series.setdefault(series_of[image[1]], []).append(image)
    return [
        row
        for series_uid, members in by_series.items()
        for row in similar.embedding_rows(
            result_id=result.id,
            study_instance_uid=result.study_instance_uid,
            series_instance_uid=series_uid,
            images=members,
            key=similar.model_key(result.model_name, result.model_sha256),
        )
    ]


# -- delivery -------------------------------------------------------------------------------


def deliver(ctx: WorkerContext, delivery_id: int) -> str:
    """Send one result to one destination; schedules its retry with back-off on failure."""
    now = utcnow()
    with ctx.db.session() as session:
        claimed = changed_rows(
            session,
            update(Delivery)
            .where(Delivery.id == delivery_id, Delivery.state == DeliveryState.PENDING)
            .values(state=DeliveryState.SENDING, attempts=Delivery.attempts + 1, updated_at=now),
        )
        delivery = session.get(Delivery, delivery_id)
        if not claimed or delivery is None:
            return delivery.state if delivery is not None else "missing"
        result = session.get(Result, delivery.result_id)
        attempt = DeliveryAttempt(delivery_id=delivery_id, started_at=now)
        session.add(attempt)
        session.flush()
        attempt_id = attempt.id
    assert result is not None
    destination = ctx.settings.destinations.get(delivery.destination)
    error: str | None = None
    gone = False  # the destination is no longer configured: no retry can help
    if delivery.destination == FHIR_DESTINATION:
        gone = ctx.settings.fhir_endpoint is None
        error = _push_fhir(ctx, result)
    elif destination is None:
        gone = True
        error = f"destination {delivery.destination!r} is no longer configured"
    else:
        files: list[Path] = []
        if delivery.forward_source:
            # the sources first, so a PACS holds the images before the results that refer to them
            files += [ctx.settings.store_dir / name for name in result.files.get("sources", [])]
        files += _result_files(ctx, result, destination.objects)
        if not files:
            error = (f"result {result.id} has none of the objects {delivery.destination!r} "
                     f"takes ({', '.join(destination.objects)})")
        try:
            if error is None:
                if isinstance(destination, DicomwebDestination):
                    stow_files(destination, files)
                else:
                    send_files(destination, files, calling_ae=ctx.settings.ae_title)
        except (DeliveryError, OSError) as exc:
            error = str(exc) or type(exc).__name__
    finished = utcnow()
    with ctx.db.session() as session:
        row = session.get(DeliveryAttempt, attempt_id)
        assert row is not None
        row.finished_at = finished
        row.ok = error is None
        row.error = error
        current = session.get(Delivery, delivery_id)
        assert current is not None
        current.updated_at = finished
        current.last_error = error
        if error is None:
            current.state = DeliveryState.DONE
        elif gone or current.attempts >= ctx.settings.delivery_max_attempts:
            current.state = DeliveryState.FAILED
            log.error(
                "delivery %d to %s failed for good: %s", delivery_id, current.destination, error
            )
        else:
            backoff = ctx.settings.delivery_backoff_seconds * 2 ** (current.attempts - 1)
            current.state = DeliveryState.PENDING
            current.next_attempt_at = finished + timedelta(seconds=backoff)
            current.dispatched_at = None
            log.warning(
                "delivery %d to %s failed (attempt %d), retry in %.1f s: %s",
                delivery_id,
                current.destination,
                current.attempts,
                backoff,
                error,
            )
        return current.state
