"""The audit trail: who (a calling AE, an API client) did what, when, to which studies.

Rows of ``audit_events`` (``dicom_node.db.AuditEvent``), read by ``GET /audit``:

- DICOM, per association, written when it ends (released or aborted), so the C-STORE path pays
  nothing per instance: one ``association`` row (calling AE @ address, how it ended, counts) and
  one ``c-store`` row per study stored over it (instance count), plus a ``c-store`` row with
  ``ok = false`` listing the SOP Instance UIDs refused and their statuses. A rejected
  association is an ``association-rejected`` row. The counts come from the C-STORE responses the
  node sent (``EVT_DIMSE_SENT``), the study UIDs from the instances table.
- API: every request that changes something (POST, PUT, PATCH, DELETE; for example a delivery
  retry), with the client address, method, path and status code.

Only UIDs, AE titles and addresses are recorded; never patient names or IDs. A failure to write
an audit row is logged and does not fail the C-STORE or the request.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException, Query, Request, Response
from pynetdicom import evt
from pynetdicom.events import Event
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from dicom_node.db import AuditEvent, Instance, StateDB

log = logging.getLogger(__name__)

_MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_CHUNK = 500
_C_STORE_RSP = 0x8001  # CommandField of a C-STORE response


def record(
    db: StateDB,
    *,
    actor_kind: str,
    actor: str,
    action: str,
    ok: bool = True,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    detail: dict[str, Any] | str | None = None,
) -> None:
    """Write one audit row; logs (never raises) when the DB refuses it."""
    text = json.dumps(detail, sort_keys=True) if isinstance(detail, dict) else detail
    try:
        with db.session() as session:
            session.add(
                AuditEvent(
                    actor_kind=actor_kind,
                    actor=actor[:128],
                    action=action,
                    ok=ok,
                    study_instance_uid=study_instance_uid,
                    series_instance_uid=series_instance_uid,
                    sop_instance_uid=sop_instance_uid,
                    detail=text,
                )
            )
    except SQLAlchemyError as exc:
        log.error("cannot write the audit row %s by %s: %s", action, actor, exc)


@dataclass
class _Association:
    actor: str
    stored: list[str] = field(default_factory=list)
    refused: list[tuple[str, int]] = field(default_factory=list)


class DicomAudit:
    """pynetdicom notification handlers that audit associations and their C-STOREs."""

    def __init__(self, db: StateDB) -> None:
        self.db = db
        self._lock = threading.Lock()
        self._open: dict[int, _Association] = {}

    def handlers(self) -> list[tuple[Any, Callable[[Event], None]]]:
        return [
            (evt.EVT_ACCEPTED, self._accepted),
            (evt.EVT_REJECTED, self._rejected),
            (evt.EVT_DIMSE_SENT, self._response_sent),
            (evt.EVT_RELEASED, self._released),
            (evt.EVT_ABORTED, self._aborted),
        ]

    @staticmethod
    def _actor(event: Event) -> str:
        requestor = event.assoc.requestor
        return f"{str(requestor.ae_title).strip()}@{requestor.address}"

    def _accepted(self, event: Event) -> None:
        with self._lock:
            self._open[id(event.assoc)] = _Association(self._actor(event))

    def _rejected(self, event: Event) -> None:
        record(self.db, actor_kind="dicom", actor=self._actor(event),
               action="association-rejected", ok=False)

    def _response_sent(self, event: Event) -> None:
        command = event.message.command_set
        if command.get("CommandField") != _C_STORE_RSP or command.get("Status") is None:
            return
        sop = str(command.get("AffectedSOPInstanceUID") or "")
        status = int(command.Status)
        with self._lock:
            state = self._open.get(id(event.assoc))
            if state is None:
                return
            if status == 0x0000:
                state.stored.append(sop)
            else:
                state.refused.append((sop, status))

    def _released(self, event: Event) -> None:
        self._close(event, "released")

    def _aborted(self, event: Event) -> None:
        self._close(event, "aborted")

    def _close(self, event: Event, how: str) -> None:
        with self._lock:
            state = self._open.pop(id(event.assoc), None)
        if state is None:  # already closed (an abort after the release)
            return
        studies = self._studies(state.stored)
        record(
            self.db, actor_kind="dicom", actor=state.actor, action="association",
            ok=how == "released" and not state.refused,
            study_instance_uid=next(iter(studies)) if len(studies) == 1 else None,
            detail={"end": how, "stored": len(state.stored), "refused": len(state.refused),
                    "studies": sorted(studies)},
        )
        for study, series in sorted(studies.items()):
            record(
                self.db, actor_kind="dicom", actor=state.actor, action="c-store",
                study_instance_uid=study,
                series_instance_uid=next(iter(series)) if len(series) == 1 else None,
                detail={"instances": sum(series.values()), "series": sorted(series)},
            )
        if state.refused:
            record(
                self.db, actor_kind="dicom", actor=state.actor, action="c-store", ok=False,
                sop_instance_uid=state.refused[0][0] if len(state.refused) == 1 else None,
                detail={"refused": [{"sop_instance_uid": sop, "status": f"0x{status:04X}"}
                                    for sop, status in state.refused[:100]]},
            )

    def _studies(self, sop_uids: list[str]) -> dict[str, dict[str, int]]:
        """{StudyInstanceUID: {SeriesInstanceUID: instances}} of the stored SOP Instance UIDs."""
        found: dict[str, dict[str, int]] = {}
        unique = sorted(set(sop_uids))
        try:
            with self.db.session() as session:
                for start in range(0, len(unique), _CHUNK):
                    rows = session.execute(
                        select(Instance.study_instance_uid, Instance.series_instance_uid).where(
                            Instance.sop_instance_uid.in_(unique[start : start + _CHUNK])
                        )
                    ).all()
                    for study, series in rows:
                        per_series = found.setdefault(study, {})
                        per_series[series] = per_series.get(series, 0) + 1
        except SQLAlchemyError as exc:
            log.error("audit: cannot look up the studies of an association: %s", exc)
        return found


def install_api_audit(app: FastAPI, db: StateDB) -> None:
    """Audit every API request that changes something, and serve ``GET /audit``."""

    @app.middleware("http")
    async def audit_changes(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        if request.method in _MUTATING:
            client = request.client.host if request.client is not None else "unknown"
            # the DB write runs in the thread pool, not on the event loop
            await run_in_threadpool(
                record, db, actor_kind="api", actor=client,
                action=f"api-{request.method.lower()}", ok=response.status_code < 400,
                detail={"path": request.url.path, "status": response.status_code},
            )
        return response

    app.include_router(audit_router(db))


def _event_json(row: AuditEvent) -> dict[str, Any]:
    detail: Any = row.detail
    if detail:
        with contextlib.suppress(json.JSONDecodeError):
            detail = json.loads(detail)
    return {
        "id": row.id,
        "at": row.at.isoformat() + "Z",
        "actor_kind": row.actor_kind,
        "actor": row.actor,
        "action": row.action,
        "ok": row.ok,
        "study_instance_uid": row.study_instance_uid,
        "series_instance_uid": row.series_instance_uid,
        "sop_instance_uid": row.sop_instance_uid,
        "detail": detail,
    }


def audit_router(db: StateDB) -> APIRouter:
    router = APIRouter()

    @router.get("/audit")
    def audit_events(
        action: str | None = None,
        actor: str | None = None,
        study: str | None = Query(None, description="StudyInstanceUID"),
        since: str | None = Query(None, description="ISO time (UTC), e.g. 2026-11-22T01:00"),
        limit: int = Query(200, ge=1, le=5000),
    ) -> dict[str, Any]:
        """Audit events, newest first."""
        query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
        if action is not None:
            query = query.where(AuditEvent.action == action)
        if actor is not None:
            query = query.where(AuditEvent.actor.startswith(actor))
        if study is not None:
            query = query.where(AuditEvent.study_instance_uid == study)
        if since is not None:
            try:
                moment = datetime.fromisoformat(since.replace("Z", "+00:00"))
            except ValueError as exc:
                raise HTTPException(422, f"since must be an ISO time, not {since!r}") from exc
            if moment.tzinfo is not None:
                moment = moment.astimezone(UTC).replace(tzinfo=None)
            query = query.where(AuditEvent.at >= moment)
        with db.session() as session:
            rows = session.scalars(query).all()
            return {"items": [_event_json(row) for row in rows]}

    return router


