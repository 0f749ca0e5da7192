"""STOW-RS destinations in the configuration, and the STOW-RS sender's failure reporting against
a port nobody listens on (no node needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from pydicom import dcmread
from support.dicom_factory import make_us_series
from support.ports import free_port
from support.shared_data import busi_png_paths

from dicom_node.scu import DeliveryError
from dicom_node.settings import Destination, DicomwebDestination, Settings
from dicom_node.stow_client import stow_files


def test_destinations_are_cstore_or_dicomweb() -> None:
    settings = Settings(
        destinations={
            "pacs": {"host": "127.0.0.1", "port": 4242, "ae_title": "ORTHANC"},
            "web": {"dicomweb": "http://pacs.example:8042/dicom-web"},
        },
        routes=[{"send_to": ["pacs", "web"]}],
    )
    assert isinstance(settings.destinations["pacs"], Destination)
    web = settings.destinations["web"]
    assert isinstance(web, DicomwebDestination)
    assert web.dicomweb == "http://pacs.example:8042/dicom-web" and web.timeout_seconds == 60
    # defaults keep today's behaviour
    assert Settings().upload_max_bytes == 200_000_000


@pytest.mark.parametrize(
    "entry",
    [
        {"dicomweb": "ftp://pacs/dicom-web"},  # not HTTP
        {"dicomweb": "http://pacs/dicom-web", "ae_title": "X"},  # two kinds mixed
        {"host": "pacs", "port": 104},  # C-STORE without an AE title
        {"dicomweb": "http://pacs/dicom-web", "timeout_seconds": 0},
    ],
)
def test_bad_destination_is_refused(entry: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Settings(destinations={"bad": entry})


def test_stow_to_nobody_raises_delivery_error(shared_data: Path, tmp_path: Path) -> None:
    [path] = make_us_series(busi_png_paths(shared_data, "benign")[:1], tmp_path)
    destination = DicomwebDestination(
        dicomweb=f"http://127.0.0.1:{free_port()}/dicom-web", timeout_seconds=5
    )
    with pytest.raises(DeliveryError, match="STOW-RS to http://127.0.0.1:.*/studies failed"):
        stow_files(destination, [path])
    assert dcmread(path).Modality == "US"  # the file is untouched
