"""The dashboard's files: served from dicom_node/static by name only, with their types; no
build step (the page's scripts and styles are plain files and link nothing outside the node)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from dicom_node.api import create_api
from dicom_node.dashboard import STATIC_DIR
from dicom_node.db import StateDB
from dicom_node.settings import Settings


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    db = StateDB(f"sqlite:///{tmp_path / 'state.db'}")
    return TestClient(create_api(Settings(data_dir=tmp_path), db))


def test_the_page_and_its_files(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<table id="worklist"' in page.text
    for name, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        response = client.get(f"/static/{name}")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith(kind)
        assert response.text == (STATIC_DIR / name).read_text()
    # nothing is fetched from outside the node (the machine has no internet)
    for name in ("index.html", "dashboard.js", "dashboard.css"):
        assert not re.search(r"https?://", (STATIC_DIR / name).read_text()), name


@pytest.mark.parametrize("name", ["nope.js", ".hidden.js", "..%2Fdashboard.py", "state.db",
                                  "index"])
def test_other_names_are_not_served(client: TestClient, name: str) -> None:
    assert client.get(f"/static/{name}").status_code == 404


def test_source_image_of_an_unknown_instance_is_404(client: TestClient) -> None:
    assert client.get("/instances/1.2.3/image.png").status_code == 404
