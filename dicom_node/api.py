"""The REST API (FastAPI): health, studies with their jobs, results and deliveries; the
worklist, FHIR DiagnosticReports and Prometheus metrics."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector
from sqlalchemy import func, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from dicom_node.api_errors import install_api_errors
from dicom_node.audit import install_api_audit
from dicom_node.auth import install_api_auth
from dicom_node.dashboard import dashboard_router
from dicom_node.db import (
    Delivery,
    DeliveryAttempt,
    DeliveryState,
    Instance,
    Job,
    JobSeries,
    JobState,
    Result,
    Series,
    SeriesState,
    StateDB,
    Study,
)
from dicom_node.dicomweb import DicomwebService, dicomweb_router
from dicom_node.dispatch import retry_delivery
from dicom_node.settings import Settings
from dicom_node.similar import similar_router
from dicom_node.store import SeriesWrites
from dicom_node.upload import upload_router
from reports.fhir import BreastFinding, ReportFacts, diagnostic_report, searchset

FHIR_JSON = "application/fhir+json"
_DATE = re.compile(r"^(\d{4})-?(\d{2})-?(\d{2})$")


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() + "Z" if value is not None else None


def _result_json(result: Result, deliveries: list[Delivery]) -> dict[str, Any]:
    return {
        "id": result.id,
        "job_id": result.job_id,
        "series_instance_uid": result.series_instance_uid,
        "modality": result.modality,
        "label": result.label,
        "probability": result.probability,
        "probabilities": result.probabilities,
        "not_assessable": result.not_assessable,
        "model": {
            "name": result.model_name,
            "version": result.model_version,
            "sha256": result.model_sha256,
        },
        "sr_sop_instance_uid": result.sr_sop_instance_uid,
        "sr": f"/results/{result.id}/sr.dcm",
        "suspicion": result.suspicion,
        "priority": result.priority,
        "predecessor_id": result.predecessor_id,
        "heatmaps": _heatmap_links(result),
        "per_image": result.files.get("per_image", []),
        "series_instance_uids": _result_series(result),
        "breasts": _breasts_json(result),
        "created_at": _iso(result.created_at),
        "deliveries": [_delivery_json(d) for d in deliveries],
    }


def _result_series(result: Result) -> list[str]:
    """The series whose images the result analysed (several for a mammography study)."""
    seen = [str(p["series_instance_uid"]) for p in result.files.get("per_image", [])
            if p.get("series_instance_uid")]
    return list(dict.fromkeys(seen)) or [result.series_instance_uid]


def _breasts_json(result: Result) -> list[dict[str, Any]]:
    """The per-breast findings of a mammography result (its SR's breast groups): laterality,
    label, probabilities and the views used, each with its heatmap."""
    breasts = []
    for group in result.files.get("groups", []):
        if group.get("scope", "breast") != "breast":
            continue  # the study's own group: the result's label and probabilities
        images = group.get("images") or [
            {"sop_instance_uid": sop, "view_position": view}
            for sop, view in zip(group.get("sop_instance_uids", []), group.get("views", []),
                                 strict=False)
        ]
        breasts.append({
            "laterality": group.get("laterality"),
            "label": group.get("label"),
            "probabilities": group.get("probabilities"),
            "views": [
                {
                    **image,
                    **({"heatmap": f"/results/{result.id}/heatmap.png?index={image['index']}"}
                       if "index" in image else {}),
                }
                for image in images
            ],
        })
    return breasts


def _series_jobs(session: Session, series_uids: Iterable[str]) -> dict[str, list[Job]]:
    """The jobs of each series, oldest first: its own, and the mammography study jobs that
    covered it (``job_series``)."""
    uids = list(series_uids)
    jobs: dict[str, dict[int, Job]] = {uid: {} for uid in uids}
    if not uids:
        return {}
    for job in session.scalars(select(Job).where(Job.series_instance_uid.in_(uids))).all():
        jobs[job.series_instance_uid][job.id] = job
    linked = session.execute(
        select(JobSeries.series_instance_uid, Job)
        .join(Job, Job.id == JobSeries.job_id)
        .where(JobSeries.series_instance_uid.in_(uids))
    ).all()
    for uid, job in linked:
        jobs[uid][job.id] = job
    return {uid: [by_id[i] for i in sorted(by_id)] for uid, by_id in jobs.items()}


def _delivery_json(delivery: Delivery) -> dict[str, Any]:
    return {
        "id": delivery.id,
        "result_id": delivery.result_id,
        "destination": delivery.destination,
        "forward_source": delivery.forward_source,
        "state": delivery.state,
        "attempts": delivery.attempts,
        "last_error": delivery.last_error,
        "next_attempt_at": _iso(delivery.next_attempt_at),
        "updated_at": _iso(delivery.updated_at),
    }


def _operation_outcome(code: str, diagnostics: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}],
    }


def _job_json(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "state": job.state,
        "attempts": job.attempts,
        "reason": job.reason,
        "instance_count": job.instance_count,
        "created_at": _iso(job.created_at),
        "finished_at": _iso(job.finished_at),
    }


def _heatmap_links(result: Result) -> list[str]:
    return [
        f"/results/{result.id}/heatmap.png?index={i}"
        for i in range(1, len(result.files.get("png", [])) + 1)
    ]


def _da(value: str | None, name: str) -> str | None:
    """A query date (YYYYMMDD or YYYY-MM-DD) as DICOM DA; 422 otherwise."""
    if value is None:
        return None
    match = _DATE.match(value)
    if match is None:
        raise HTTPException(422, f"{name} must be YYYYMMDD or YYYY-MM-DD, not {value!r}")
    return "".join(match.groups())


def _study_state(series: Iterable[Series], latest_jobs: dict[str, Job]) -> str:
    """receiving > analysing > failed > done, over the study's series."""
    states: set[str] = set()
    for row in series:
        job = latest_jobs.get(row.series_instance_uid)
        if row.state == SeriesState.RECEIVING:
            states.add("receiving")
        elif job is None or job.state in (JobState.PENDING, JobState.QUEUED, JobState.RUNNING):
            states.add("analysing")
        elif job.state == JobState.FAILED:
            states.add("failed")
        else:
            states.add("done")
    for state in ("receiving", "analysing", "failed", "done"):
        if state in states:
            return state
    return "receiving"


def worklist_items(db: StateDB) -> list[dict[str, Any]]:
    """One item per study, ordered by suspicion (highest first, unknown last), then arrival.

    A study's finding is that of its most suspicious current result (the latest result of each
    series; a superseded result does not count).
    """
    with db.session() as session:
        studies = session.scalars(select(Study)).all()
        series_rows = session.scalars(select(Series)).all()
        latest_job_ids = session.execute(
            select(Job.series_instance_uid, func.max(Job.id)).group_by(Job.series_instance_uid)
        ).all()
        # a series covered by a mammography study job keyed by another series of its study
        latest_linked = session.execute(
            select(JobSeries.series_instance_uid, func.max(JobSeries.job_id)).group_by(
                JobSeries.series_instance_uid
            )
        ).all()
        latest: dict[str, int] = {}
        for uid, job_id in [*latest_job_ids, *latest_linked]:
            latest[uid] = max(job_id, latest.get(uid, job_id))
        by_id = {
            job.id: job
            for job in session.scalars(select(Job).where(Job.id.in_(set(latest.values())))).all()
        }
        jobs = {uid: by_id[job_id] for uid, job_id in latest.items() if job_id in by_id}
        latest_result_ids = session.execute(
            select(Result.series_instance_uid, func.max(Result.id)).group_by(
                Result.series_instance_uid
            )
        ).all()
        results = session.scalars(
            select(Result).where(Result.id.in_([rid for _uid, rid in latest_result_ids]))
        ).all()
    series_of: dict[str, list[Series]] = {}
    for row in series_rows:
        series_of.setdefault(row.study_instance_uid, []).append(row)
    results_of: dict[str, list[Result]] = {}
    for result in results:
        results_of.setdefault(result.study_instance_uid, []).append(result)
    items: list[dict[str, Any]] = []
    for study in studies:
        uid = study.study_instance_uid
        series = series_of.get(uid, [])
        current = sorted(results_of.get(uid, []), key=lambda r: r.id)
        lead = max(
            current,
            key=lambda r: (r.suspicion is not None, r.suspicion or 0.0, r.id),
            default=None,
        )
        modalities = sorted({row.modality for row in series if row.modality})
        items.append(
            {
                "study_instance_uid": uid,
                "accession_number": study.accession_number,
                "study_date": study.study_date,
                "modality": "\\".join(modalities) or None,
                "modalities": modalities,
                "label": lead.label if lead is not None else None,
                "probability": lead.probability if lead is not None else None,
                "suspicion": lead.suspicion if lead is not None else None,
                "priority": any(r.priority for r in current),
                "state": _study_state(series, jobs),
                "result_ids": [r.id for r in current],
                "heatmaps": [link for r in current for link in _heatmap_links(r)],
                "received_at": _iso(study.created_at),
                "_arrival": study.created_at,
            }
        )
    items.sort(
        key=lambda item: (
            item["suspicion"] is None,
            -(item["suspicion"] or 0.0),
            item["_arrival"],
            item["study_instance_uid"],
        )
    )
    for item in items:
        del item["_arrival"]
    return items


def _report_facts(result: Result, study: Study | None, base_url: str) -> ReportFacts:
    sides = {
        str(p.get("laterality")) for p in result.files.get("per_image", []) if p.get("laterality")
    }
    return ReportFacts(
        result_id=result.id,
        study_instance_uid=result.study_instance_uid,
        modality=result.modality,
        label=result.label,
        probabilities=result.probabilities,
        model_name=result.model_name,
        model_version=result.model_version,
        model_sha256=result.model_sha256,
        sr_sop_instance_uid=result.sr_sop_instance_uid,
        issued=result.created_at,
        sr_url=f"{base_url}/results/{result.id}/sr.dcm",
        patient_id=study.patient_id if study is not None else None,
        accession_number=study.accession_number if study is not None else None,
        study_date=study.study_date if study is not None else None,
        laterality=sides.pop() if len(sides) == 1 else None,
        suspicion=result.suspicion,
        priority=result.priority if result.suspicion is not None else None,
        heatmap_urls=[base_url + link for link in _heatmap_links(result)],
        breasts=[
            BreastFinding(b["laterality"], b["label"], b["probabilities"])
            for b in _breasts_json(result)
        ],
    )


# public: the FHIR push (workers.tasks) sends the same report as GET /fhir/DiagnosticReport
report_facts = _report_facts


class StateCollector(Collector):
    """Prometheus metrics computed from the state DB at scrape time (true across processes)."""

    def __init__(self, db: StateDB, queue_depth: Callable[[], int | None] | None) -> None:
        self.db = db
        self.queue_depth = queue_depth

    def collect(self) -> Iterable[Metric]:
        with self.db.session() as session:
            instances = session.execute(
                select(Series.modality, func.count(Instance.sop_instance_uid))
                .join(Series, Series.series_instance_uid == Instance.series_instance_uid)
                .group_by(Series.modality)
            ).all()
            series_states = session.execute(
                select(Series.state, func.count()).group_by(Series.state)
            ).all()
            jobs_total = session.scalar(select(func.count()).select_from(Job)) or 0
            job_states = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
            inference = session.execute(
                select(func.count(Result.inference_seconds), func.sum(Result.inference_seconds))
            ).one()
            results = session.execute(
                select(Result.modality, Result.label, func.count()).group_by(
                    Result.modality, Result.label
                )
            ).all()
            priority = session.scalar(
                select(func.count()).select_from(Result).where(Result.priority.is_(True))
            ) or 0
            attempts = session.execute(
                select(Delivery.destination, DeliveryAttempt.ok, func.count())
                .join(Delivery, Delivery.id == DeliveryAttempt.delivery_id)
                .group_by(Delivery.destination, DeliveryAttempt.ok)
            ).all()
            deliveries = session.execute(
                select(Delivery.destination, Delivery.state, func.count()).group_by(
                    Delivery.destination, Delivery.state
                )
            ).all()
        received = CounterMetricFamily(
            "breastcad_instances_received", "Instances stored", labels=["modality"]
        )
        for modality, count in instances:
            received.add_metric([modality or ""], count)
        yield received
        yield CounterMetricFamily(
            "breastcad_series_completed",
            "Series completions (each makes an analysis job; the MG series of a mammography "
            "study complete as one; a re-opened series completes again)",
            value=jobs_total,
        )
        series_gauge = GaugeMetricFamily("breastcad_series", "Series by state", labels=["state"])
        counted = dict(series_states)
        for state in SeriesState:
            series_gauge.add_metric([state.value], counted.get(state.value, 0))
        yield series_gauge
        jobs_gauge = GaugeMetricFamily("breastcad_jobs", "Analysis jobs by state", labels=["state"])
        counted = dict(job_states)
        for job_state in JobState:
            jobs_gauge.add_metric([job_state.value], counted.get(job_state.value, 0))
        yield jobs_gauge
        yield SummaryMetricFamily(
            "breastcad_inference_seconds",
            "Model and Grad-CAM time per analysed series",
            count_value=int(inference[0] or 0),
            sum_value=float(inference[1] or 0.0),
        )
        results_counter = CounterMetricFamily(
            "breastcad_results", "Results made", labels=["modality", "label"]
        )
        for modality, label, count in results:
            results_counter.add_metric([modality, label], count)
        yield results_counter
        yield CounterMetricFamily(
            "breastcad_priority_results", "Results flagged priority", value=priority
        )
        attempts_counter = CounterMetricFamily(
            "breastcad_delivery_attempts", "Delivery attempts", labels=["destination"]
        )
        failures_counter = CounterMetricFamily(
            "breastcad_delivery_failures", "Failed delivery attempts", labels=["destination"]
        )
        per_destination: dict[str, list[int]] = {}
        for destination, ok, count in attempts:
            totals = per_destination.setdefault(destination, [0, 0])
            totals[0] += count
            if not ok:
                totals[1] += count
        for destination, (total, failed) in sorted(per_destination.items()):
            attempts_counter.add_metric([destination], total)
            failures_counter.add_metric([destination], failed)
        yield attempts_counter
        yield failures_counter
        deliveries_gauge = GaugeMetricFamily(
            "breastcad_deliveries", "Deliveries by destination and state",
            labels=["destination", "state"],
        )
        for destination, delivery_state, count in deliveries:
            deliveries_gauge.add_metric([destination, delivery_state], count)
        yield deliveries_gauge
        depth = GaugeMetricFamily(
            "breastcad_queue_depth",
            "Work waiting: jobs pending or queued (db), messages in the broker queue (broker)",
            labels=["source"],
        )
        counted = dict(job_states)
        depth.add_metric(
            ["db"], counted.get(JobState.PENDING.value, 0) + counted.get(JobState.QUEUED.value, 0)
        )
        broker = self.queue_depth() if self.queue_depth is not None else None
        if broker is not None:
            depth.add_metric(["broker"], broker)
        yield depth


def create_api(
    settings: Settings,
    db: StateDB,
    *,
    queue_depth: Callable[[], int | None] | None = None,
    writes: SeriesWrites | None = None,
) -> FastAPI:
    """The API over the state DB; ``queue_depth`` (the broker's) feeds ``/metrics``; STOW-RS
    registers its writes in ``writes`` (the dispatcher's, when it runs in this process)."""
    app = FastAPI(
        title="breastcad",
        version="0.1.0",
        description="AI analysis of breast images as a DICOM node: studies, results, deliveries.",
    )
    install_api_auth(app, settings)
    install_api_errors(app)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateCollector(db, queue_depth))
    dicomweb = DicomwebService(settings, db, writes)
    app.include_router(dicomweb_router(dicomweb))
    app.include_router(upload_router(settings, dicomweb))

    @app.get("/health")
    def health() -> dict[str, Any]:
        try:
            with db.session() as session:
                session.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            raise HTTPException(503, f"state DB unavailable: {exc}") from exc
        return {
            "status": "ok",
            "ae_title": settings.ae_title,
            "dicom_port": settings.dicom_port,
            "broker": "redis" if settings.distributed else "embedded",
            "database": "sqlite" if db.is_sqlite else "postgresql",
            "embedded_worker": settings.embedded_worker,
        }

    @app.get("/studies")
    def list_studies(limit: int = Query(100, ge=1, le=1000)) -> dict[str, Any]:
        with db.session() as session:
            studies = session.scalars(
                select(Study).order_by(Study.created_at.desc()).limit(limit)
            ).all()
            items = []
            for study in studies:
                series = session.scalars(
                    select(Series).where(Series.study_instance_uid == study.study_instance_uid)
                ).all()
                latest = session.scalars(
                    select(Result)
                    .where(Result.study_instance_uid == study.study_instance_uid)
                    .order_by(Result.id.desc())
                    .limit(1)
                ).first()
                items.append(
                    {
                        "study_instance_uid": study.study_instance_uid,
                        "accession_number": study.accession_number,
                        "study_date": study.study_date,
                        "modalities": sorted({s.modality for s in series if s.modality}),
                        "series_count": len(series),
                        "label": latest.label if latest else None,
                        "probability": latest.probability if latest else None,
                        "received_at": _iso(study.created_at),
                    }
                )
        return {"items": items}

    @app.get("/studies/{study_instance_uid}")
    def get_study(study_instance_uid: str) -> dict[str, Any]:
        with db.session() as session:
            study = session.get(Study, study_instance_uid)
            if study is None:
                raise HTTPException(404, f"no study {study_instance_uid}")
            series_rows = session.scalars(
                select(Series)
                .where(Series.study_instance_uid == study_instance_uid)
                .order_by(Series.first_instance_at)
            ).all()
            series_out = []
            jobs_of = _series_jobs(session, (s.series_instance_uid for s in series_rows))
            study_results: dict[int, dict[str, Any]] = {}
            for series in series_rows:
                count = session.scalar(
                    select(func.count())
                    .select_from(Instance)
                    .where(Instance.series_instance_uid == series.series_instance_uid)
                )
                jobs = jobs_of.get(series.series_instance_uid, [])
                # its own results, and those of the mammography study jobs that covered it
                results = session.scalars(
                    select(Result)
                    .where(
                        (Result.series_instance_uid == series.series_instance_uid)
                        | Result.job_id.in_([j.id for j in jobs])
                    )
                    .order_by(Result.id)
                ).all()
                results_out = []
                for result in results:
                    if result.id not in study_results:
                        deliveries = list(
                            session.scalars(
                                select(Delivery)
                                .where(Delivery.result_id == result.id)
                                .order_by(Delivery.id)
                            ).all()
                        )
                        study_results[result.id] = _result_json(result, deliveries)
                    results_out.append(study_results[result.id])
                series_out.append(
                    {
                        "series_instance_uid": series.series_instance_uid,
                        "modality": series.modality,
                        "state": series.state,
                        "instance_count": count,
                        "calling_ae": series.calling_ae,
                        "last_instance_at": _iso(series.last_instance_at),
                        "jobs": [_job_json(j) for j in jobs],
                        "job_state": jobs[-1].state if jobs else None,
                        "results": results_out,
                        "prediction": (
                            {
                                "label": results[-1].label,
                                "probabilities": results[-1].probabilities,
                            }
                            if results
                            else None
                        ),
                    }
                )
        return {
            "study_instance_uid": study.study_instance_uid,
            "accession_number": study.accession_number,
            "study_date": study.study_date,
            "series": series_out,
            # every result of the study once (a mammography study's covers several series)
            "results": [study_results[i] for i in sorted(study_results)],
        }

    @app.get("/results/{result_id}/heatmap.png", response_class=FileResponse)
    def heatmap(result_id: int, index: int = Query(1, ge=1)) -> FileResponse:
        with db.session() as session:
            result = session.get(Result, result_id)
        if result is None:
            raise HTTPException(404, f"no result {result_id}")
        pngs = result.files.get("png", [])
        if index > len(pngs):
            raise HTTPException(404, f"result {result_id} has {len(pngs)} heatmap(s)")
        path = settings.results_dir / pngs[index - 1]
        if not path.exists():
            raise HTTPException(410, f"heatmap file of result {result_id} is gone")
        return FileResponse(path, media_type="image/png")

    @app.get("/results/{result_id}/sr.dcm", response_class=FileResponse)
    def sr_file(result_id: int) -> FileResponse:
        with db.session() as session:
            result = session.get(Result, result_id)
        if result is None:
            raise HTTPException(404, f"no result {result_id}")
        path = settings.results_dir / result.files["sr"]
        if not path.exists():
            raise HTTPException(410, f"SR file of result {result_id} is gone")
        return FileResponse(path, media_type="application/dicom")

    @app.get("/worklist")
    def worklist(
        modality: str | None = None,
        state: str | None = Query(None, pattern="^(receiving|analysing|failed|done)$"),
        date_from: str | None = Query(None, description="StudyDate from (YYYYMMDD or ISO)"),
        date_to: str | None = Query(None, description="StudyDate to, inclusive"),
        priority: bool | None = None,
        limit: int = Query(200, ge=1, le=5000),
    ) -> dict[str, Any]:
        low, high = _da(date_from, "date_from"), _da(date_to, "date_to")
        items = []
        for item in worklist_items(db):
            if modality is not None and modality.upper() not in item["modalities"]:
                continue
            if state is not None and item["state"] != state:
                continue
            if priority is not None and item["priority"] != priority:
                continue
            date = item["study_date"]
            if (low is not None or high is not None) and not date:
                continue
            if low is not None and date < low or high is not None and date > high:
                continue
            items.append(item)
        return {"items": items[:limit]}

    def fhir_base(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    @app.get("/fhir/DiagnosticReport/{result_id}")
    def fhir_report(result_id: int, request: Request) -> JSONResponse:
        with db.session() as session:
            result = session.get(Result, result_id)
            if result is None:
                return JSONResponse(
                    _operation_outcome("not-found", f"no DiagnosticReport {result_id}"),
                    status_code=404,
                    media_type=FHIR_JSON,
                )
            study = session.get(Study, result.study_instance_uid)
        report = diagnostic_report(_report_facts(result, study, fhir_base(request)))
        return JSONResponse(report, media_type=FHIR_JSON)

    @app.get("/fhir/DiagnosticReport")
    def fhir_search(
        request: Request,
        patient: str | None = None,
        study: str | None = None,
        limit: int = Query(100, alias="_count", ge=1, le=1000),
    ) -> JSONResponse:
        """Search by patient (identifier, or Patient/<id>) and/or study (StudyInstanceUID)."""
        base = fhir_base(request)
        query = select(Result, Study).join(
            Study, Study.study_instance_uid == Result.study_instance_uid
        )
        if patient is not None:
            patient_id = patient.split("|")[-1].removeprefix("Patient/")
            query = query.where(Study.patient_id == patient_id)
        if study is not None:
            query = query.where(
                Result.study_instance_uid == study.removeprefix("urn:oid:").split("|")[-1]
            )
        with db.session() as session:
            rows = session.execute(query.order_by(Result.id.desc()).limit(limit)).all()
        reports = [diagnostic_report(_report_facts(r, s, base)) for r, s in rows]
        return JSONResponse(searchset(reports, f"{base}/fhir"), media_type=FHIR_JSON)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/deliveries")
    def list_deliveries(
        state: DeliveryState | None = None, limit: int = Query(100, ge=1, le=1000)
    ) -> dict[str, Any]:
        with db.session() as session:
            query = select(Delivery).order_by(Delivery.id.desc()).limit(limit)
            if state is not None:
                query = query.where(Delivery.state == state)
            rows = session.scalars(query).all()
            return {"items": [_delivery_json(d) for d in rows]}

    @app.get("/deliveries/{delivery_id}")
    def get_delivery(delivery_id: int) -> dict[str, Any]:
        with db.session() as session:
            delivery = session.get(Delivery, delivery_id)
            if delivery is None:
                raise HTTPException(404, f"no delivery {delivery_id}")
            attempts = session.scalars(
                select(DeliveryAttempt)
                .where(DeliveryAttempt.delivery_id == delivery_id)
                .order_by(DeliveryAttempt.id)
            ).all()
            out = _delivery_json(delivery)
            out["attempt_log"] = [
                {
                    "started_at": _iso(a.started_at),
                    "finished_at": _iso(a.finished_at),
                    "ok": a.ok,
                    "error": a.error,
                }
                for a in attempts
            ]
            return out

    @app.post("/deliveries/{delivery_id}/retry", status_code=202)
    def retry(delivery_id: int) -> dict[str, Any]:
        with db.session() as session:
            delivery = session.get(Delivery, delivery_id)
        if delivery is None:
            raise HTTPException(404, f"no delivery {delivery_id}")
        if not retry_delivery(db, delivery_id):
            raise HTTPException(409, f"delivery {delivery_id} is {delivery.state}; not retried")
        return {"id": delivery_id, "state": DeliveryState.PENDING}

    @app.get("/jobs")
    def list_jobs(
        state: str | None = None, limit: int = Query(100, ge=1, le=1000)
    ) -> dict[str, Any]:
        with db.session() as session:
            query = select(Job).order_by(Job.id.desc()).limit(limit)
            if state is not None:
                query = query.where(Job.state == state)
            rows = session.scalars(query).all()
            covered: dict[int, list[str]] = {}
            for job_id, uid in session.execute(
                select(JobSeries.job_id, JobSeries.series_instance_uid)
                .join(Series, Series.series_instance_uid == JobSeries.series_instance_uid)
                .where(JobSeries.job_id.in_([j.id for j in rows]))
                .order_by(Series.first_instance_at, Series.series_instance_uid)
            ).all():
                covered.setdefault(job_id, []).append(uid)
            return {
                "items": [
                    {
                        **_job_json(j),
                        "series_instance_uid": j.series_instance_uid,
                        # a mammography study job: every series it analyses (its own first)
                        "series_instance_uids": covered.get(j.id, [j.series_instance_uid]),
                    }
                    for j in rows
                ]
            }

    install_api_audit(app, db)
    app.include_router(similar_router(db))
    app.include_router(dashboard_router(settings, db))
    return app
