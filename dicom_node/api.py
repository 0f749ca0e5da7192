"""The REST API (FastAPI): health, studies with their jobs, results and deliveries."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import FileResponse
from sqlalchemy import func, select, text
from sqlalchemy.exc import SQLAlchemyError

from dicom_node.db import (
    Delivery,
    DeliveryAttempt,
    DeliveryState,
    Instance,
    Job,
    Result,
    Series,
    StateDB,
    Study,
)
from dicom_node.dispatch import retry_delivery
from dicom_node.settings import Settings


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
        "heatmaps": [
            f"/results/{result.id}/heatmap.png?index={i}"
            for i in range(1, len(result.files.get("png", [])) + 1)
        ],
        "per_image": result.files.get("per_image", []),
        "created_at": _iso(result.created_at),
        "deliveries": [_delivery_json(d) for d in deliveries],
    }


def _delivery_json(delivery: Delivery) -> dict[str, Any]:
    return {
        "id": delivery.id,
        "result_id": delivery.result_id,
        "destination": delivery.destination,
        "state": delivery.state,
        "attempts": delivery.attempts,
        "last_error": delivery.last_error,
        "next_attempt_at": _iso(delivery.next_attempt_at),
        "updated_at": _iso(delivery.updated_at),
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


def create_api(settings: Settings, db: StateDB) -> FastAPI:
    app = FastAPI(
        title="breastcad",
        version="0.1.0",
        description="AI analysis of breast images as a DICOM node: studies, results, deliveries.",
    )

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
            for series in series_rows:
                count = session.scalar(
                    select(func.count())
                    .select_from(Instance)
                    .where(Instance.series_instance_uid == series.series_instance_uid)
                )
                jobs = session.scalars(
                    select(Job)
                    .where(Job.series_instance_uid == series.series_instance_uid)
                    .order_by(Job.id)
                ).all()
                results = session.scalars(
                    select(Result)
                    .where(Result.series_instance_uid == series.series_instance_uid)
                    .order_by(Result.id)
                ).all()
                results_out = []
                for result in results:
                    deliveries = list(
                        session.scalars(
                            select(Delivery)
                            .where(Delivery.result_id == result.id)
                            .order_by(Delivery.id)
                        ).all()
                    )
                    results_out.append(_result_json(result, deliveries))
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
            return {
                "items": [
                    {**_job_json(j), "series_instance_uid": j.series_instance_uid} for j in rows
                ]
            }

    return app
