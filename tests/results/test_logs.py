"""JSON log lines: fields, UIDs found in the message, extra identifiers, exceptions."""

from __future__ import annotations

import json
import logging

from dicom_node.logs import JsonFormatter

STUDY = "1.2.826.0.1.3680043.8.498.12345"


def _record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("breastcad.test", logging.WARNING, __file__, 1, message, args, None)
    record.__dict__.update(extra)
    return record


def test_a_json_line_has_the_fields_and_the_uids_of_its_message() -> None:
    line = JsonFormatter().format(
        _record("series %s of study %s stored (v1.2.3)", f"{STUDY}.1", STUDY, job_id=7)
    )
    data = json.loads(line)
    assert data["level"] == "WARNING" and data["logger"] == "breastcad.test"
    assert data["message"] == f"series {STUDY}.1 of study {STUDY} stored (v1.2.3)"
    assert data["uids"] == [f"{STUDY}.1", STUDY]  # "1.2.3" of v1.2.3 is no UID
    assert data["job_id"] == 7
    assert data["time"].endswith("Z")


def test_an_exception_is_one_field_of_one_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = _record("failed")
        import sys

        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert "\n" not in line
    assert "ValueError: boom" in json.loads(line)["exception"]
