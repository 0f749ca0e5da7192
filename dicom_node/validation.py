"""Checks a received dataset must pass before it is stored, each failure a DICOM status.

Cheap checks only (no pixel decoding on the ingest path): the identifying UIDs, the SOP Class
against the request, pixel data present and consistent with Rows x Columns, a pixel budget that
refuses decompression bombs, and a decoder for the transfer syntax.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragmented_frames
from pydicom.pixels import get_decoder
from pydicom.uid import UID

# DICOM status codes we answer with (PS3.4 Annex B, C-STORE)
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_SOP_CLASS_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000  # the dataset cannot be parsed
STATUS_MISSING_UIDS = 0xC001  # an identifying UID is absent or malformed
STATUS_BAD_PIXEL_DATA = 0xC002  # pixel data missing, short, or not decodable
STATUS_TOO_LARGE = 0xC003  # more pixels than the configured budget

# What pydicom may raise while parsing a malformed byte stream.
DATASET_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    EOFError,
    OverflowError,
    NotImplementedError,
    AttributeError,
    struct.error,
    UnicodeDecodeError,
    RecursionError,  # sequences nested a few hundred deep
)


class InvalidInstance(ValueError):
    """A dataset that must not be stored, with the DICOM status to answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Identity:
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str


def _uid(dataset: Dataset, keyword: str) -> str:
    value = dataset.get(keyword)
    text = str(value).strip() if value is not None else ""
    if not text:
        raise InvalidInstance(STATUS_MISSING_UIDS, f"{keyword} is missing")
    if not UID(text).is_valid:
        raise InvalidInstance(STATUS_MISSING_UIDS, f"{keyword} is not a valid UID")
    return text


def check_identity(
    dataset: Dataset, affected_sop_class_uid: str, affected_sop_instance_uid: str
) -> Identity:
    """The four UIDs that place an instance, consistent with the C-STORE request."""
    identity = Identity(
        sop_class_uid=_uid(dataset, "SOPClassUID"),
        sop_instance_uid=_uid(dataset, "SOPInstanceUID"),
        series_instance_uid=_uid(dataset, "SeriesInstanceUID"),
        study_instance_uid=_uid(dataset, "StudyInstanceUID"),
    )
    if identity.sop_class_uid != affected_sop_class_uid:
        raise InvalidInstance(
            STATUS_SOP_CLASS_MISMATCH,
            "SOPClassUID in the dataset differs from the request's Affected SOP Class UID",
        )
    if identity.sop_instance_uid != affected_sop_instance_uid:
        raise InvalidInstance(
            STATUS_SOP_CLASS_MISMATCH,
            "SOPInstanceUID in the dataset differs from the request's Affected SOP Instance UID",
        )
    return identity


def _positive_int(dataset: Dataset, keyword: str, default: int | None = None) -> int:
    value = dataset.get(keyword, default)
    try:
        number = int(value) if value is not None else -1
    except (TypeError, ValueError) as exc:
        raise InvalidInstance(STATUS_BAD_PIXEL_DATA, f"{keyword} is not a number") from exc
    if number < 1:
        raise InvalidInstance(STATUS_BAD_PIXEL_DATA, f"{keyword} is missing or not positive")
    return number


def check_pixel_data(dataset: Dataset, transfer_syntax_uid: str, max_pixels: int) -> None:
    """Pixel data is present, within budget, and consistent with its description."""
    if "PixelData" not in dataset:
        raise InvalidInstance(STATUS_BAD_PIXEL_DATA, "the image has no Pixel Data")
    rows = _positive_int(dataset, "Rows")
    columns = _positive_int(dataset, "Columns")
    samples = _positive_int(dataset, "SamplesPerPixel", 1)
    bits_allocated = _positive_int(dataset, "BitsAllocated")
    frames = _positive_int(dataset, "NumberOfFrames", 1)
    if rows * columns > max_pixels:
        raise InvalidInstance(
            STATUS_TOO_LARGE,
            f"a {rows}x{columns} frame exceeds the pixel budget of {max_pixels} pixels per frame",
        )
    transfer_syntax = UID(transfer_syntax_uid)
    pixel_data = dataset.PixelData
    if not isinstance(pixel_data, bytes | bytearray):
        raise InvalidInstance(STATUS_BAD_PIXEL_DATA, "Pixel Data is not a byte string")
    if transfer_syntax.is_encapsulated:
        decoder = get_decoder(transfer_syntax)
        if not decoder.is_available:
            raise InvalidInstance(
                STATUS_BAD_PIXEL_DATA, f"no decoder for transfer syntax {transfer_syntax.name}"
            )
        try:
            count = sum(1 for _ in generate_fragmented_frames(pixel_data, number_of_frames=frames))
        except DATASET_DECODE_ERRORS as exc:
            raise InvalidInstance(
                STATUS_BAD_PIXEL_DATA, f"encapsulated Pixel Data cannot be parsed: {exc}"
            ) from exc
        if count < 1:
            raise InvalidInstance(STATUS_BAD_PIXEL_DATA, "encapsulated Pixel Data has no frames")
        return
    if bits_allocated % 8 != 0:
        return  # 1-bit data: packed, skip the length arithmetic
    expected = rows * columns * samples * (bits_allocated // 8) * frames
    if len(pixel_data) < expected:
        raise InvalidInstance(
            STATUS_BAD_PIXEL_DATA,
            f"Pixel Data holds {len(pixel_data)} bytes but {frames}x{rows}x{columns}x{samples} "
            f"at {bits_allocated} bits needs {expected}",
        )
