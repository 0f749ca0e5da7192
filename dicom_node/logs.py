"""Process logging: plain text, or one JSON object per line (``log_format: json``).

A JSON line holds ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``, the exception
if any, the fields passed with ``extra=`` whose names are known identifiers (UIDs, job, result
and delivery ids, AE titles), and ``uids``: every DICOM UID written in the message, so a log
search by StudyInstanceUID works without parsing messages. Messages never carry patient names or
IDs (the node logs UIDs and AE titles only; tests/reliability/test_phi_in_logs.py checks).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Literal

_UID = re.compile(r"(?<![\w.])[0-2](?:\.(?:0|[1-9]\d*)){3,}(?![\w.])")
FIELDS = (
    "study_instance_uid",
    "series_instance_uid",
    "sop_instance_uid",
    "job_id",
    "result_id",
    "delivery_id",
    "calling_ae",
    "destination",
)


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ).replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                out[name] = value
        uids = _UID.findall(message)
        if uids:
            out["uids"] = list(dict.fromkeys(uids))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str, log_format: Literal["text", "json"] = "text") -> None:
    """Route every logger (ours, pynetdicom's, uvicorn's, celery's) to stderr in one format."""
    handler = logging.StreamHandler(sys.stderr)
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    if log_format == "json":
        # uvicorn and celery install their own handlers; make them go through the root's
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "celery.task"):
            named = logging.getLogger(name)
            for old in list(named.handlers):
                named.removeHandler(old)
            named.propagate = True
