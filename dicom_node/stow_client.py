"""The STOW-RS sender: result objects (and forwarded sources) to a DICOMweb destination.

One ``POST {dicomweb}/studies`` per study with every file as an ``application/dicom`` part of a
``multipart/related`` body, streamed from disk (one file in memory at a time). Success is a 200
response without a FailedSOPSequence; anything else raises ``DeliveryError`` (the same error the
C-STORE sender raises), so a delivery is retried and recorded the same way whichever kind of
destination it goes to.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_node.scu import DeliveryError
from dicom_node.settings import DicomwebDestination

log = logging.getLogger(__name__)


def _part_header(boundary: str) -> bytes:
    return f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()


def _body(files: Sequence[Path], boundary: str) -> Iterator[bytes]:
    for path in files:
        yield _part_header(boundary)
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                yield chunk
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def _body_length(files: Sequence[Path], boundary: str) -> int:
    per_part = len(_part_header(boundary)) + 2
    return sum(path.stat().st_size + per_part for path in files) + len(f"--{boundary}--\r\n")


def _failures(response: httpx.Response) -> list[str]:
    """The FailedSOPSequence of a STOW-RS response as 'UID: reason' strings."""
    if not response.content:
        return []
    try:
        dataset = Dataset.from_json(response.json())
    except (json.JSONDecodeError, ValueError, TypeError, KeyError):
        return []
    failures: list[str] = []
    for item in dataset.get("FailedSOPSequence", []):
        reason = item.get("FailureReason")
        code = f"0x{int(reason):04X}" if reason is not None else "no reason given"
        failures.append(f"{item.get('ReferencedSOPInstanceUID', '?')}: failure {code}")
    return failures


def stow_files(
    destination: DicomwebDestination, files: Sequence[Path], *, client: httpx.Client | None = None
) -> None:
    """Store every file at the destination by STOW-RS; raise DeliveryError unless all were.

    Files are grouped by StudyInstanceUID, one request per study (``/studies`` would do for
    all, but a server may file a request under one study).
    """
    by_study: dict[str, list[Path]] = {}
    for path in files:
        header = dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
        by_study.setdefault(str(header.StudyInstanceUID), []).append(path)
    url = destination.dicomweb.rstrip("/") + "/studies"
    own = client is None
    http = client or httpx.Client(timeout=destination.timeout_seconds, trust_env=False)
    problems: list[str] = []
    try:
        for study, paths in by_study.items():
            boundary = secrets.token_hex(16)
            headers = {
                "Content-Type": (
                    f'multipart/related; type="application/dicom"; boundary={boundary}'
                ),
                "Content-Length": str(_body_length(paths, boundary)),
                "Accept": "application/dicom+json",
            }
            try:
                response = http.post(url, content=_body(paths, boundary), headers=headers)
            except httpx.HTTPError as exc:
                raise DeliveryError(f"STOW-RS to {url} failed: {exc}") from exc
            failures = _failures(response)
            if response.status_code != 200 or failures:
                detail = "; ".join(failures) or response.text[:300]
                problems.append(
                    f"study {study}: HTTP {response.status_code} from {url}: {detail}"
                )
    finally:
        if own:
            http.close()
    if problems:
        raise DeliveryError("; ".join(problems))
    log.info("delivered %d object(s) by STOW-RS to %s", len(files), url)
