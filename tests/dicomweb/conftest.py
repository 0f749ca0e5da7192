"""Fixtures for the DICOMweb tests: one breastcad node (a real ``breastcad serve`` subprocess)
whose results go by STOW-RS to a private Orthanc with Debian's DICOMweb plugin, and to a
DICOMweb URL nobody listens on (the retry path).

The node's DICOMweb side is driven with ``dicomweb-client`` (a client written by others) and with
raw HTTP where a request must be malformed on purpose.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_E2E = str(Path(__file__).resolve().parents[1] / "e2e")
if _E2E not in sys.path:
    sys.path.insert(0, _E2E)

from node_process import Node  # noqa: E402
from support.orthanc import OrthancServer, require_dicomweb_plugin  # noqa: E402
from support.ports import free_port  # noqa: E402


@pytest.fixture(scope="module")
def dicomweb_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """A private Orthanc with the DICOMweb plugin loaded (root ``.dicomweb_url``)."""
    require_dicomweb_plugin()
    with OrthancServer(workdir=tmp_path_factory.mktemp("orthanc-dw"), dicomweb=True) as server:
        yield server


@pytest.fixture(scope="module")
def dw_node(
    tmp_path_factory: pytest.TempPathFactory,
    dicomweb_orthanc: OrthancServer,
    shared_data: Path,
) -> Iterator[Node]:
    """A node sending every result by STOW-RS to Orthanc (``pacs``) and to a dead URL (``down``,
    two attempts)."""
    node = Node(
        tmp_path_factory.mktemp("dw-node"),
        pacs_port=dicomweb_orthanc.dicom_port,
        extra={
            "destinations": {
                "pacs": {"dicomweb": dicomweb_orthanc.dicomweb_url},
                "down": {
                    "dicomweb": f"http://127.0.0.1:{free_port()}/dicom-web",
                    "timeout_seconds": 5,
                },
            },
            "routes": [{"send_to": ["pacs", "down"]}],
            "delivery_max_attempts": 2,
            "delivery_backoff_seconds": 0.2,
        },
    )
    node.start()
    try:
        yield node
    finally:
        node.stop()
