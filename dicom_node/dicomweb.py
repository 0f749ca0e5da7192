"""DICOMweb under ``/dicomweb``: STOW-RS in, QIDO-RS search, WADO-RS retrieval and rendering.

STOW-RS stores each instance with exactly the rules of the C-STORE listener
(``dicom_node.validation`` checks, ``dicom_node.store.InstanceStore`` writes: durable before the
response, a duplicate stored once), so a completed series is analysed like any other. breastcad's
own results (the SR and the SC heatmaps under ``results/``) are found by QIDO and returned by WADO
too: they are indexed in two tables of their own (``dicomweb_result_objects`` and
``dicomweb_indexed_results``), filled lazily from the ``results`` rows before each query, so the
existing tables and the workers are unchanged.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import secrets
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from email.message import Message
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any, TypeVar

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image
from pydicom import dcmread
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import DateTime, Integer, String, Text, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from dicom_node.db import Instance, Result, Series, StateDB, Study, utcnow
from dicom_node.scp import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES
from dicom_node.settings import Settings
from dicom_node.store import InstanceKey, InstanceStore, SeriesWrites, StoreWriteError
from dicom_node.validation import (
    DATASET_DECODE_ERRORS,
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SOP_CLASS_MISMATCH,
    InvalidInstance,
    check_identity,
    check_pixel_data,
)
from inference import image_from_dataset

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
#: PS3.18 failure reasons beyond the C-STORE statuses of ``dicom_node.validation``
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
#: a private block for the human-readable reason of a refused instance (FailedSOPSequence items)
PRIVATE_CREATOR = "BREASTCAD"
_PRIVATE_GROUP = 0x0009
_REASON_ELEMENT = 0x01


#: QIDO matching keys that identify a patient: their values are kept out of the access log
_PATIENT_KEYS_IN_QUERY = re.compile(
    r"(?<=[?&])(PatientID|PatientName|PatientBirthDate|AccessionNumber|"
    r"00100020|00100010|00100030|00080050)=[^&\s\"]*",
    re.IGNORECASE,
)


class RedactPatientQueryFilter(logging.Filter):
    """Replaces the values of patient-identifying query keys in uvicorn's access log lines
    (``GET /dicomweb/studies?PatientID=...`` would otherwise log the patient ID)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(
                _PATIENT_KEYS_IN_QUERY.sub(r"\1=***", arg) if isinstance(arg, str) else arg
                for arg in record.args
            )
        elif isinstance(record.msg, str):
            record.msg = _PATIENT_KEYS_IN_QUERY.sub(r"\1=***", record.msg)
        return True


def install_access_log_redaction() -> None:
    """Add :class:`RedactPatientQueryFilter` to ``uvicorn.access`` once."""
    access_log = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactPatientQueryFilter) for f in access_log.filters):
        access_log.addFilter(RedactPatientQueryFilter())


class MultipartError(ValueError):
    """The request body is not a well-formed multipart/related message (HTTP 400)."""


@dataclass(frozen=True)
class Part:
    content_type: str | None
    content: bytes


def media_type(value: str) -> tuple[str, dict[str, str]]:
    """A Content-Type or Accept item as (lower-case type, parameters)."""
    message = Message()
    message["content-type"] = value
    params: dict[str, str] = {}
    for key, param in message.get_params(failobj=[])[1:]:
        params[key.lower()] = str(param)
    return message.get_content_type(), params


def split_multipart(body: bytes, boundary: str) -> list[Part]:
    """The parts of a multipart body (RFC 2046); MultipartError when it is malformed."""
    if not boundary:
        raise MultipartError("the multipart Content-Type has no boundary parameter")
    try:
        delimiter = b"--" + boundary.encode("ascii")
    except UnicodeEncodeError as exc:
        raise MultipartError("the boundary must be ASCII (RFC 2046)") from exc
    if len(boundary) > 70:
        raise MultipartError("the boundary is longer than 70 characters (RFC 2046)")
    start = body.find(delimiter)
    if start < 0 or (start > 0 and body[start - 2 : start] != b"\r\n"):
        raise MultipartError(f"the body does not contain the boundary {boundary!r}")
    position = start + len(delimiter)
    parts: list[Part] = []
    parser = BytesHeaderParser()
    while True:
        if body[position : position + 2] == b"--":
            break  # the close delimiter
        line_end = body.find(b"\r\n", position)
        if line_end < 0 or body[position:line_end].strip(b" \t"):
            raise MultipartError("a boundary line is not followed by CRLF")
        position = line_end + 2
        following = body.find(b"\r\n" + delimiter, position)
        if following < 0:
            raise MultipartError(
                f"part {len(parts) + 1} is not terminated by the boundary (truncated body?)"
            )
        raw = body[position:following]
        if raw.startswith(b"\r\n"):
            headers_raw, content = b"", raw[2:]
        else:
            header_end = raw.find(b"\r\n\r\n")
            if header_end < 0:
                raise MultipartError(f"part {len(parts) + 1} has no blank line after its headers")
            headers_raw, content = raw[: header_end + 4], raw[header_end + 4 :]
        headers = parser.parsebytes(headers_raw) if headers_raw else Message()
        part_type = headers.get("content-type")
        parts.append(Part(str(part_type) if part_type is not None else None, content))
        position = following + 2 + len(delimiter)
    if not parts:
        raise MultipartError("the multipart body has no parts")
    return parts


# -- the index of breastcad's own result objects ---------------------------------------------


class IndexBase(DeclarativeBase):
    pass


class ResultObject(IndexBase):
    """A result SR or SC heatmap, as QIDO and WADO see it (file under the results dir)."""

    __tablename__ = "dicomweb_result_objects"

    sop_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    result_id: Mapped[int] = mapped_column(Integer, index=True)
    path: Mapped[str] = mapped_column(Text)  # relative to the results dir
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class IndexedResult(IndexBase):
    """A ``results`` row whose objects are in ``dicomweb_result_objects``."""

    __tablename__ = "dicomweb_indexed_results"

    result_id: Mapped[int] = mapped_column(Integer, primary_key=True)


def create_index_tables(db: StateDB) -> None:
    """Create the two index tables when missing (additive: no other table changes)."""
    with db.engine.begin() as connection:
        if not db.is_sqlite:
            connection.execute(text("SELECT pg_advisory_xact_lock(724012)"))
        IndexBase.metadata.create_all(connection)


@dataclass(frozen=True)
class Record:
    """One instance QIDO/WADO knows: received (``store``) or made by breastcad (``results``)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    modality: str | None
    series_number: int | None
    instance_number: int | None
    transfer_syntax_uid: str
    path: Path


@dataclass
class StowOutcome:
    """What happened to one part of a STOW-RS request."""

    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    failure: int | None = None
    reason: str | None = None
    duplicate: bool = False

    @property
    def stored(self) -> bool:
        return self.failure is None


@dataclass
class _Matcher:
    """The parsed QIDO matching keys."""

    values: dict[str, str] = field(default_factory=dict)
    limit: int | None = None
    offset: int = 0


class DicomwebService:
    """Storing (STOW), finding (QIDO) and reading (WADO) instances over the state DB."""

    def __init__(
        self, settings: Settings, db: StateDB, writes: SeriesWrites | None = None
    ) -> None:
        self.settings = settings
        self.db = db
        self.store = InstanceStore(settings.store_dir, db, writes)
        self._index_lock = threading.Lock()
        create_index_tables(db)

    # -- STOW ---------------------------------------------------------------------------

    def store_instance(
        self, content: bytes, content_type: str | None, study_instance_uid: str | None = None
    ) -> StowOutcome:
        """Check and store one Part 10 instance with the listener's rules; never raises for
        bad input (the outcome says why it was refused)."""
        outcome = StowOutcome()
        try:
            self._store(content, content_type, study_instance_uid, outcome)
        except InvalidInstance as exc:
            outcome.failure, outcome.reason = exc.status, exc.reason
        except DATASET_DECODE_ERRORS as exc:
            outcome.failure = STATUS_CANNOT_UNDERSTAND
            outcome.reason = f"dataset cannot be decoded ({type(exc).__name__})"
        except StoreWriteError as exc:
            log.error("cannot store instance %s: %s", outcome.sop_instance_uid, exc)
            outcome.failure = STATUS_OUT_OF_RESOURCES
            outcome.reason = "out of resources: cannot write the instance"
        if outcome.failure is not None:
            log.warning(
                "STOW-RS refused instance %s: %s (0x%04X)",
                outcome.sop_instance_uid or "(unknown)",
                outcome.reason,
                outcome.failure,
            )
        return outcome

    def _store(
        self,
        content: bytes,
        content_type: str | None,
        study_instance_uid: str | None,
        outcome: StowOutcome,
    ) -> None:
        if content_type is not None and media_type(content_type)[0] != "application/dicom":
            raise InvalidInstance(
                STATUS_CANNOT_UNDERSTAND,
                f"part has Content-Type {content_type!r}; only application/dicom is accepted",
            )
        try:
            dataset = dcmread(io.BytesIO(content))
        except InvalidDicomError as exc:
            raise InvalidInstance(
                STATUS_CANNOT_UNDERSTAND,
                "not a DICOM Part 10 file (no 128-byte preamble and DICM prefix)",
            ) from exc
        outcome.sop_class_uid = str(dataset.get("SOPClassUID", "")).strip() or None
        outcome.sop_instance_uid = str(dataset.get("SOPInstanceUID", "")).strip() or None
        transfer_syntax = str(dataset.file_meta.get("TransferSyntaxUID", "")).strip()
        if not transfer_syntax:
            raise InvalidInstance(
                STATUS_CANNOT_UNDERSTAND, "the file meta has no Transfer Syntax UID"
            )
        identity = check_identity(
            dataset, outcome.sop_class_uid or "", outcome.sop_instance_uid or ""
        )
        outcome.study_instance_uid = identity.study_instance_uid
        outcome.series_instance_uid = identity.series_instance_uid
        if identity.sop_class_uid not in STORAGE_SOP_CLASSES:
            raise InvalidInstance(
                STATUS_SOP_CLASS_NOT_SUPPORTED,
                f"SOP Class {identity.sop_class_uid} is not one breastcad accepts",
            )
        if transfer_syntax not in TRANSFER_SYNTAXES:
            raise InvalidInstance(
                STATUS_TRANSFER_SYNTAX_NOT_SUPPORTED,
                f"transfer syntax {transfer_syntax} is not supported",
            )
        if study_instance_uid is not None and identity.study_instance_uid != study_instance_uid:
            raise InvalidInstance(
                STATUS_SOP_CLASS_MISMATCH,
                "StudyInstanceUID differs from the study named in the request URL",
            )
        check_pixel_data(dataset, transfer_syntax, self.settings.max_frame_pixels)
        key = InstanceKey(
            sop_class_uid=identity.sop_class_uid,
            sop_instance_uid=identity.sop_instance_uid,
            series_instance_uid=identity.series_instance_uid,
            study_instance_uid=identity.study_instance_uid,
            transfer_syntax_uid=transfer_syntax,
        )
        stored = self.store.store(key, content, dataset, None)
        outcome.duplicate = stored.duplicate
        if stored.duplicate:
            log.info("STOW-RS: duplicate instance %s stored once", key.sop_instance_uid)

    # -- the result index ---------------------------------------------------------------

    def sync_result_index(self) -> int:
        """Index the SR and SC files of results not indexed yet; returns how many objects."""
        added = 0
        with self._index_lock:
            with self.db.session() as session:
                pending = session.scalars(
                    select(Result)
                    .where(Result.id.not_in(select(IndexedResult.result_id)))
                    .order_by(Result.id)
                ).all()
            for result in pending:
                added += self._index_result(result)
        return added

    def _index_result(self, result: Result) -> int:
        names = [str(result.files.get("sr", ""))] + [str(n) for n in result.files.get("sc", [])]
        objects: list[ResultObject] = []
        for name in names:
            if not name:
                continue
            path = self.settings.results_dir / name
            try:
                ds = dcmread(path, stop_before_pixels=True)
            except (OSError, InvalidDicomError) as exc:
                log.warning("result %d: cannot index %s: %s", result.id, name, exc)
                continue
            objects.append(
                ResultObject(
                    sop_instance_uid=str(ds.SOPInstanceUID),
                    sop_class_uid=str(ds.SOPClassUID),
                    study_instance_uid=str(ds.StudyInstanceUID),
                    series_instance_uid=str(ds.SeriesInstanceUID),
                    modality=str(ds.get("Modality", "")).strip() or None,
                    series_number=_int(ds.get("SeriesNumber")),
                    instance_number=_int(ds.get("InstanceNumber")),
                    transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                    result_id=result.id,
                    path=name,
                )
            )
        try:
            with self.db.session() as session:
                for obj in objects:
                    existing = session.get(ResultObject, obj.sop_instance_uid)
                    if existing is None:
                        session.add(obj)
                    elif existing.result_id < obj.result_id:
                        # the same deterministic UIDs made again by a later result: its file
                        existing.result_id, existing.path = obj.result_id, obj.path
                session.add(IndexedResult(result_id=result.id))
        except IntegrityError:
            return 0  # another process indexed it meanwhile
        return len(objects)

    # -- QIDO ---------------------------------------------------------------------------

    def records(
        self,
        *,
        study_filters: dict[str, str],
        study_instance_uid: str | None = None,
        series_instance_uid: str | None = None,
        sop_instance_uid: str | None = None,
    ) -> tuple[dict[str, Study], list[Record]]:
        """Studies matching the study-level keys, and every instance record they hold (received
        and results), narrowed to the given series/instance."""
        self.sync_result_index()
        query = select(Study)
        if study_instance_uid is not None:
            query = query.where(Study.study_instance_uid == study_instance_uid)
        for keyword, value in study_filters.items():
            if keyword == "StudyInstanceUID":
                query = query.where(Study.study_instance_uid.in_(_uid_list(value)))
            elif keyword == "PatientID":
                query = query.where(_string_match(Study.patient_id, value))
            elif keyword == "AccessionNumber":
                query = query.where(_string_match(Study.accession_number, value))
            elif keyword == "StudyDate":
                low, high = _date_range(value)
                if low is not None:
                    query = query.where(Study.study_date >= low)
                if high is not None:
                    query = query.where(Study.study_date <= high)
        records: list[Record] = []
        with self.db.session() as session:
            studies = {s.study_instance_uid: s for s in session.scalars(query).all()}
            uids = list(studies)
            for chunk in _chunks(uids, 500):
                received = (
                    select(
                        Instance.study_instance_uid,
                        Instance.series_instance_uid,
                        Instance.sop_instance_uid,
                        Instance.sop_class_uid,
                        Series.modality,
                        Instance.instance_number,
                        Instance.transfer_syntax_uid,
                        Instance.path,
                    )
                    .join(Series, Series.series_instance_uid == Instance.series_instance_uid)
                    .where(Instance.study_instance_uid.in_(chunk))
                )
                made = select(
                    ResultObject.study_instance_uid,
                    ResultObject.series_instance_uid,
                    ResultObject.sop_instance_uid,
                    ResultObject.sop_class_uid,
                    ResultObject.modality,
                    ResultObject.series_number,
                    ResultObject.instance_number,
                    ResultObject.transfer_syntax_uid,
                    ResultObject.path,
                ).where(ResultObject.study_instance_uid.in_(chunk))
                if series_instance_uid is not None:
                    received = received.where(
                        Instance.series_instance_uid == series_instance_uid
                    )
                    made = made.where(ResultObject.series_instance_uid == series_instance_uid)
                if sop_instance_uid is not None:
                    received = received.where(Instance.sop_instance_uid == sop_instance_uid)
                    made = made.where(ResultObject.sop_instance_uid == sop_instance_uid)
                for study, series, sop, sop_class, modality, number, syntax, path in (
                    session.execute(received)
                ):
                    records.append(
                        Record(
                            study, series, sop, sop_class, modality, None, number, syntax,
                            self.settings.store_dir / path,
                        )
                    )
                for row in session.execute(made):
                    records.append(Record(*row[:8], path=self.settings.results_dir / row[8]))
        records.sort(
            key=lambda r: (r.study_instance_uid, r.series_instance_uid, r.instance_number or 0,
                           r.sop_instance_uid)
        )
        return studies, records


# -- QIDO helpers ------------------------------------------------------------------------------

_STUDY_KEYS = ("StudyInstanceUID", "PatientID", "AccessionNumber", "StudyDate")
_SERIES_KEYS = ("SeriesInstanceUID", "Modality")
_INSTANCE_KEYS = ("SOPInstanceUID", "SOPClassUID")
_T = TypeVar("_T")
_CONTROL = {"limit", "offset", "includefield", "fuzzymatching"}
_DA = re.compile(r"^\d{8}$")


def _int(value: object) -> int | None:
    try:
        return int(str(value)) if value not in (None, "") else None
    except ValueError:
        return None


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _uid_list(value: str) -> list[str]:
    """UID list matching: several UIDs separated by backslash or comma."""
    return [uid.strip() for uid in re.split(r"[\\,]", value) if uid.strip()]


def _string_match(column: Any, value: str) -> Any:
    """Single value matching, with ``*`` and ``?`` wildcards (PS3.4 C.2.2.2.4)."""
    if "*" not in value and "?" not in value:
        return column == value
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return column.like(escaped.replace("*", "%").replace("?", "_"), escape="\\")


def _wildcard(value: str, candidate: str | None) -> bool:
    if candidate is None:
        return False
    pattern = "".join(
        ".*" if c == "*" else "." if c == "?" else re.escape(c) for c in value
    )
    return re.fullmatch(pattern, candidate) is not None


def _date_range(value: str) -> tuple[str | None, str | None]:
    """A DA value or range (``a-b``, ``-b``, ``a-``) as inclusive bounds; 400 when malformed."""
    text_value = value.strip()
    if "-" in text_value:
        low, _, high = text_value.partition("-")
    else:
        low = high = text_value
    for bound in (low, high):
        if bound and not _DA.match(bound):
            raise HTTPException(
                400, f"StudyDate must be YYYYMMDD or a range YYYYMMDD-YYYYMMDD, not {value!r}"
            )
    if not low and not high:
        raise HTTPException(400, "StudyDate range needs at least one bound")
    return low or None, high or None


def parse_query(request: Request, allowed: Sequence[str]) -> _Matcher:
    """Matching keys (keywords or tags) and limit/offset; 400 for anything unsupported."""
    matcher = _Matcher()
    for key, value in request.query_params.multi_items():
        if key in _CONTROL:
            if key in ("limit", "offset"):
                try:
                    number = int(value)
                except ValueError as exc:
                    raise HTTPException(400, f"{key} must be an integer, not {value!r}") from exc
                if number < 0:
                    raise HTTPException(400, f"{key} must not be negative")
                if key == "limit":
                    matcher.limit = number
                else:
                    matcher.offset = number
            continue
        keyword = key
        if re.fullmatch(r"[0-9A-Fa-f]{8}", key):
            keyword = keyword_for_tag(int(key, 16)) or key
        if keyword == "ModalitiesInStudy":
            keyword = "Modality"
        if keyword not in allowed:
            raise HTTPException(
                400,
                f"unsupported matching key {key!r} at this level (supported: "
                f"{', '.join(allowed)}; limit, offset, includefield, fuzzymatching)",
            )
        if value.strip():  # an empty value is universal matching
            matcher.values[keyword] = value.strip()
    return matcher


def _record_matches(record: Record, values: dict[str, str]) -> bool:
    for keyword, value in values.items():
        if keyword == "Modality" and not _wildcard(value.upper(), (record.modality or "").upper()):
            return False
        if keyword == "SeriesInstanceUID" and record.series_instance_uid not in _uid_list(value):
            return False
        if keyword == "SOPInstanceUID" and record.sop_instance_uid not in _uid_list(value):
            return False
        if keyword == "SOPClassUID" and record.sop_class_uid not in _uid_list(value):
            return False
    return True


def _page(items: list[_T], matcher: _Matcher) -> list[_T]:
    end = None if matcher.limit is None else matcher.offset + matcher.limit
    return items[matcher.offset : end]


def _study_attrs(ds: Dataset, study: Study | None, uid: str) -> None:
    ds.StudyInstanceUID = uid
    ds.StudyDate = (study.study_date if study is not None else None) or ""
    ds.AccessionNumber = (study.accession_number if study is not None else None) or ""
    ds.PatientID = (study.patient_id if study is not None else None) or ""
    if study is not None and study.study_description:
        ds.StudyDescription = study.study_description


def dicom_json(ds: Dataset) -> dict[str, Any]:
    """The DICOM JSON model of ``ds``, attributes in tag order (PS3.18 F.2)."""
    return dict(sorted(ds.to_json_dict(bulk_data_threshold=1 << 20).items()))


def _json_response(items: list[Dataset]) -> Response:
    """QIDO answer: 204 No Content when nothing matches, else a DICOM JSON array."""
    if not items:
        return Response(status_code=204)
    return JSONResponse([dicom_json(item) for item in items], media_type=DICOM_JSON)


# -- WADO helpers ------------------------------------------------------------------------------


def _accepts(request: Request) -> list[tuple[str, dict[str, str]]]:
    header = request.headers.get("accept", "")
    items = [media_type(item) for item in _split_accept(header) if item.strip()]
    return items or [("*/*", {})]


def _split_accept(header: str) -> list[str]:
    """Accept items split on commas outside quotes."""
    items: list[str] = []
    current: list[str] = []
    quoted = False
    for char in header:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    items.append("".join(current))
    return items


def _wants_single_part(request: Request) -> bool:
    """True when the client asks for a bare application/dicom body (not multipart)."""
    kinds = [kind for kind, _ in _accepts(request)]
    return "application/dicom" in kinds and "multipart/related" not in kinds


def _check_transfer_syntax(request: Request, records: Sequence[Record]) -> None:
    """406 when the client names a transfer syntax other than the one an instance is stored
    in (breastcad returns instances as received, never transcoded)."""
    wanted: set[str] = set()
    for kind, params in _accepts(request):
        if kind in ("multipart/related", "application/dicom"):
            syntax = params.get("transfer-syntax")
            if syntax is None or syntax == "*":
                return
            wanted.add(syntax)
    if not wanted:
        return
    for record in records:
        if record.transfer_syntax_uid not in wanted:
            raise HTTPException(
                406,
                f"instance {record.sop_instance_uid} is stored in transfer syntax "
                f"{record.transfer_syntax_uid}; breastcad does not transcode (ask for "
                "transfer-syntax=* or that syntax)",
            )


def _multipart_files(paths: Sequence[Path], boundary: str) -> Iterator[bytes]:
    for path in paths:
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                yield chunk
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def _existing(records: Sequence[Record]) -> list[Path]:
    paths = [r.path for r in records]
    missing = [r.sop_instance_uid for r in records if not r.path.exists()]
    if missing:
        raise HTTPException(410, f"the file of instance(s) {', '.join(missing[:5])} is gone")
    return paths


def _render(path: Path, kind: str) -> bytes:
    try:
        ds = dcmread(path)
    except (OSError, InvalidDicomError) as exc:
        raise HTTPException(410, f"cannot read the stored instance: {exc}") from exc
    if "PixelData" not in ds:
        raise HTTPException(
            400, f"instance {ds.SOPInstanceUID} has no pixel data to render (an SR is text)"
        )
    try:
        pixels = image_from_dataset(ds, frame=0)
    except ValueError as exc:
        raise HTTPException(422, f"cannot render instance {ds.SOPInstanceUID}: {exc}") from exc
    out = io.BytesIO()
    image = Image.fromarray(pixels)
    if kind == "image/png":
        image.save(out, format="PNG")
    else:
        image.save(out, format="JPEG", quality=90)
    return out.getvalue()


# -- STOW response -----------------------------------------------------------------------------


def stow_response(outcomes: Sequence[StowOutcome], base_url: str) -> tuple[int, Dataset]:
    """The PS3.18 Store Instances response and its HTTP status (200 all stored, 202 some, 409
    none)."""
    response = Dataset()
    studies = {o.study_instance_uid for o in outcomes if o.stored}
    if len(studies) == 1:
        response.RetrieveURL = f"{base_url}/studies/{studies.pop()}"
    referenced: list[Dataset] = []
    failed: list[Dataset] = []
    for outcome in outcomes:
        item = Dataset()
        item.ReferencedSOPClassUID = outcome.sop_class_uid or ""
        item.ReferencedSOPInstanceUID = outcome.sop_instance_uid or ""
        if outcome.stored:
            item.RetrieveURL = (
                f"{base_url}/studies/{outcome.study_instance_uid}/series/"
                f"{outcome.series_instance_uid}/instances/{outcome.sop_instance_uid}"
            )
            referenced.append(item)
        else:
            item.FailureReason = outcome.failure
            block = item.private_block(_PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
            block.add_new(_REASON_ELEMENT, "LT", outcome.reason or "")
            failed.append(item)
    if referenced:
        response.ReferencedSOPSequence = referenced
    if failed:
        response.FailedSOPSequence = failed
    if not failed:
        return 200, response
    return (202 if referenced else 409), response


def failure_reason_text(item: Dataset) -> str | None:
    """The human-readable reason breastcad put in a FailedSOPSequence item (private tag)."""
    try:
        block = item.private_block(_PRIVATE_GROUP, PRIVATE_CREATOR)
    except KeyError:
        return None
    with contextlib.suppress(KeyError):
        return str(block[_REASON_ELEMENT].value)
    return None


async def read_body(request: Request, limit: int, what: str) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"{what} of {int(declared)} bytes exceeds the limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"{what} exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


# -- the router --------------------------------------------------------------------------------


def dicomweb_router(service: DicomwebService) -> APIRouter:
    """The DICOMweb routes (included at ``/dicomweb`` by ``create_api``)."""
    settings = service.settings
    router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])
    install_access_log_redaction()

    def base(request: Request) -> str:
        return str(request.base_url).rstrip("/") + "/dicomweb"

    async def stow(request: Request, study_instance_uid: str | None) -> Response:
        kind, params = media_type(request.headers.get("content-type", ""))
        if kind != "multipart/related":
            raise HTTPException(
                415, 'STOW-RS takes multipart/related; type="application/dicom"'
            )
        if params.get("type", "application/dicom").lower() != "application/dicom":
            raise HTTPException(
                415,
                f"multipart/related of type {params.get('type')!r} is not supported; "
                "send application/dicom parts",
            )
        body = await read_body(request, settings.stow_max_bytes, "the STOW-RS request")
        try:
            parts = split_multipart(body, params.get("boundary", ""))
        except MultipartError as exc:
            raise HTTPException(400, f"malformed multipart body: {exc}") from exc
        del body

        def store_all() -> list[StowOutcome]:
            return [
                service.store_instance(part.content, part.content_type, study_instance_uid)
                for part in parts
            ]

        outcomes = await run_in_threadpool(store_all)
        status, dataset = stow_response(outcomes, base(request))
        return JSONResponse(dicom_json(dataset), status_code=status, media_type=DICOM_JSON)

    @router.post("/studies")
    async def stow_studies(request: Request) -> Response:
        """STOW-RS: store the instances of a multipart/related application/dicom body."""
        return await stow(request, None)

    @router.post("/studies/{study_instance_uid}")
    async def stow_study(study_instance_uid: str, request: Request) -> Response:
        """STOW-RS into one study: instances of another study are refused (0xA900)."""
        return await stow(request, study_instance_uid)

    # -- QIDO --

    def search_studies(request: Request) -> Response:
        matcher = parse_query(request, _STUDY_KEYS + _SERIES_KEYS)
        study_keys = {k: v for k, v in matcher.values.items() if k in _STUDY_KEYS}
        studies, records = service.records(study_filters=study_keys)
        by_study: dict[str, list[Record]] = {}
        for record in records:
            by_study.setdefault(record.study_instance_uid, []).append(record)
        ordered = sorted(studies.values(), key=lambda s: (s.created_at, s.study_instance_uid))
        wanted = matcher.values.get("Modality")
        matched: list[tuple[Study, list[Record], list[str]]] = []
        for study in ordered:
            held = by_study.get(study.study_instance_uid, [])
            modalities = sorted({r.modality for r in held if r.modality})
            if wanted is not None and not any(_wildcard(wanted.upper(), m) for m in modalities):
                continue
            matched.append((study, held, modalities))
        items: list[Dataset] = []
        for study, held, modalities in _page(matched, matcher):
            ds = Dataset()
            _study_attrs(ds, study, study.study_instance_uid)
            ds.ModalitiesInStudy = modalities
            ds.NumberOfStudyRelatedSeries = len({r.series_instance_uid for r in held})
            ds.NumberOfStudyRelatedInstances = len(held)
            ds.RetrieveURL = f"{base(request)}/studies/{study.study_instance_uid}"
            items.append(ds)
        return _json_response(items)

    def search_series(request: Request, study_instance_uid: str | None) -> Response:
        matcher = parse_query(request, _STUDY_KEYS + _SERIES_KEYS)
        study_keys = {k: v for k, v in matcher.values.items() if k in _STUDY_KEYS}
        studies, records = service.records(
            study_filters=study_keys, study_instance_uid=study_instance_uid
        )
        series: dict[str, list[Record]] = {}
        for record in records:
            if _record_matches(record, matcher.values):
                series.setdefault(record.series_instance_uid, []).append(record)
        items: list[Dataset] = []
        for series_uid, held in _page(list(series.items()), matcher):
            first = held[0]
            ds = Dataset()
            _study_attrs(ds, studies.get(first.study_instance_uid), first.study_instance_uid)
            ds.SeriesInstanceUID = series_uid
            ds.Modality = first.modality or ""
            if first.series_number is not None:
                ds.SeriesNumber = first.series_number
            ds.NumberOfSeriesRelatedInstances = len(held)
            ds.RetrieveURL = (
                f"{base(request)}/studies/{first.study_instance_uid}/series/{series_uid}"
            )
            items.append(ds)
        return _json_response(items)

    def search_instances(
        request: Request, study_instance_uid: str | None, series_instance_uid: str | None
    ) -> Response:
        matcher = parse_query(request, _STUDY_KEYS + _SERIES_KEYS + _INSTANCE_KEYS)
        study_keys = {k: v for k, v in matcher.values.items() if k in _STUDY_KEYS}
        studies, records = service.records(
            study_filters=study_keys,
            study_instance_uid=study_instance_uid,
            series_instance_uid=series_instance_uid,
        )
        matched = [record for record in records if _record_matches(record, matcher.values)]
        items: list[Dataset] = []
        for record in _page(matched, matcher):
            ds = Dataset()
            _study_attrs(ds, studies.get(record.study_instance_uid), record.study_instance_uid)
            ds.SeriesInstanceUID = record.series_instance_uid
            ds.Modality = record.modality or ""
            ds.SOPClassUID = record.sop_class_uid
            ds.SOPInstanceUID = record.sop_instance_uid
            if record.instance_number is not None:
                ds.InstanceNumber = record.instance_number
            ds.AvailableTransferSyntaxUID = record.transfer_syntax_uid
            ds.RetrieveURL = (
                f"{base(request)}/studies/{record.study_instance_uid}/series/"
                f"{record.series_instance_uid}/instances/{record.sop_instance_uid}"
            )
            items.append(ds)
        return _json_response(items)

    @router.get("/studies")
    def qido_studies(request: Request) -> Response:
        """QIDO-RS study search (PatientID, StudyInstanceUID, AccessionNumber, StudyDate,
        ModalitiesInStudy; limit, offset)."""
        return search_studies(request)

    @router.get("/series")
    def qido_all_series(request: Request) -> Response:
        return search_series(request, None)

    @router.get("/studies/{study_instance_uid}/series")
    def qido_series(study_instance_uid: str, request: Request) -> Response:
        return search_series(request, study_instance_uid)

    @router.get("/instances")
    def qido_all_instances(request: Request) -> Response:
        return search_instances(request, None, None)

    @router.get("/studies/{study_instance_uid}/instances")
    def qido_study_instances(study_instance_uid: str, request: Request) -> Response:
        return search_instances(request, study_instance_uid, None)

    @router.get("/studies/{study_instance_uid}/series/{series_instance_uid}/instances")
    def qido_instances(
        study_instance_uid: str, series_instance_uid: str, request: Request
    ) -> Response:
        return search_instances(request, study_instance_uid, series_instance_uid)

    # -- WADO --

    def find(
        study_instance_uid: str,
        series_instance_uid: str | None = None,
        sop_instance_uid: str | None = None,
    ) -> list[Record]:
        _studies, records = service.records(
            study_filters={},
            study_instance_uid=study_instance_uid,
            series_instance_uid=series_instance_uid,
            sop_instance_uid=sop_instance_uid,
        )
        if not records:
            what = "/".join(
                u for u in (study_instance_uid, series_instance_uid, sop_instance_uid) if u
            )
            raise HTTPException(404, f"no instance under {what}")
        return records

    def retrieve(request: Request, records: list[Record], single: bool = False) -> Response:
        _check_transfer_syntax(request, records)
        paths = _existing(records)
        if single and _wants_single_part(request):
            return Response(paths[0].read_bytes(), media_type="application/dicom")
        boundary = secrets.token_hex(16)
        return StreamingResponse(
            _multipart_files(paths, boundary),
            media_type=f'multipart/related; type="application/dicom"; boundary={boundary}',
        )

    @router.get("/studies/{study_instance_uid}")
    def wado_study(study_instance_uid: str, request: Request) -> Response:
        """WADO-RS: every instance of the study (received and results), multipart."""
        return retrieve(request, find(study_instance_uid))

    @router.get("/studies/{study_instance_uid}/series/{series_instance_uid}")
    def wado_series(
        study_instance_uid: str, series_instance_uid: str, request: Request
    ) -> Response:
        return retrieve(request, find(study_instance_uid, series_instance_uid))

    @router.get("/studies/{study_instance_uid}/series/{series_instance_uid}/instances/{sop}")
    def wado_instance(
        study_instance_uid: str, series_instance_uid: str, sop: str, request: Request
    ) -> Response:
        """WADO-RS instance: multipart/related (the standard), or bare application/dicom when
        that alone is accepted."""
        return retrieve(request, find(study_instance_uid, series_instance_uid, sop), True)

    def metadata(records: list[Record]) -> Response:
        items = []
        for path in _existing(records):
            items.append(dicom_json(dcmread(path, stop_before_pixels=True)))
        return JSONResponse(items, media_type=DICOM_JSON)

    @router.get("/studies/{study_instance_uid}/series/{series_instance_uid}/metadata")
    def wado_series_metadata(study_instance_uid: str, series_instance_uid: str) -> Response:
        return metadata(find(study_instance_uid, series_instance_uid))

    @router.get(
        "/studies/{study_instance_uid}/series/{series_instance_uid}/instances/{sop}/metadata"
    )
    def wado_instance_metadata(
        study_instance_uid: str, series_instance_uid: str, sop: str
    ) -> Response:
        return metadata(find(study_instance_uid, series_instance_uid, sop))

    @router.get(
        "/studies/{study_instance_uid}/series/{series_instance_uid}/instances/{sop}/rendered"
    )
    def wado_rendered(
        study_instance_uid: str, series_instance_uid: str, sop: str, request: Request
    ) -> Response:
        """The first frame as image/jpeg (the default) or image/png, per the Accept header."""
        kind = "image/jpeg"
        for accepted, _params in _accepts(request):
            if accepted in ("image/png", "image/jpeg"):
                kind = accepted
                break
            if accepted not in ("*/*", "image/*"):
                continue
            break
        else:
            raise HTTPException(406, "rendered instances are image/jpeg or image/png")
        [record] = find(study_instance_uid, series_instance_uid, sop)
        [path] = _existing([record])
        return Response(_render(path, kind), media_type=kind)

    return router
