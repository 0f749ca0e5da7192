"""The STOW-RS multipart/related splitter and media-type parsing (pure functions)."""

from __future__ import annotations

import pytest

from dicom_node.dicomweb import MultipartError, media_type, split_multipart


def test_parts_with_preamble_headers_and_binary_content() -> None:
    body = (
        b"ignored preamble\r\n"
        b"--XyZ\r\nContent-Type: application/dicom\r\nContent-Location: a\r\n\r\n"
        b"\x00\x01\r\n--Xy not the boundary\r\n"
        b"--XyZ\r\n\r\nno headers at all\r\n"
        b"--XyZ--\r\nepilogue"
    )
    parts = split_multipart(body, "XyZ")
    assert [p.content_type for p in parts] == ["application/dicom", None]
    assert parts[0].content == b"\x00\x01\r\n--Xy not the boundary"
    assert parts[1].content == b"no headers at all"


@pytest.mark.parametrize(
    ("body", "boundary", "message"),
    [
        (b"--b\r\n\r\nx\r\n--b--", "", "no boundary"),
        (b"nothing here", "b", "does not contain the boundary"),
        (b"x--b\r\n\r\nx\r\n--b--", "b", "does not contain the boundary"),
        (b"--b junk\r\n\r\nx\r\n--b--", "b", "not followed by CRLF"),
        (b"--b\r\nContent-Type: application/dicom\r\n\r\nDICM...", "b", "not terminated"),
        (b"--b\r\nContent-Type: application/dicom\r\nno blank line\r\n--b--", "b", "blank line"),
        (b"--b--\r\n", "b", "no parts"),
        (b"--\xc3\xa9\r\n\r\nx\r\n--\xc3\xa9--", "\u00e9", "ASCII"),
        (b"", "b" * 71, "longer than 70"),
    ],
)
def test_malformed_bodies_say_why(body: bytes, boundary: str, message: str) -> None:
    with pytest.raises(MultipartError, match=message):
        split_multipart(body, boundary)


def test_media_type_parameters() -> None:
    kind, params = media_type('multipart/related; type="application/dicom"; boundary=abc')
    assert kind == "multipart/related"
    assert params == {"type": "application/dicom", "boundary": "abc"}
    assert media_type("Application/DICOM")[0] == "application/dicom"
    kind, params = media_type('multipart/related; type="application/dicom"; transfer-syntax=*')
    assert params["transfer-syntax"] == "*"
