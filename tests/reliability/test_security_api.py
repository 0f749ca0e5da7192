"""The API token: every route but /health needs it when ``api_token`` is set.

The app runs on a real uvicorn on localhost (in a thread of the test) over a SQLite state DB;
after ``create_api`` the test adds a router and a static mount, as the dashboard, DICOMweb and
upload work adds them, to show that routes added later are covered without further code. One
test runs ``breastcad serve`` as a subprocess with the token in its config; one drives Debian's
chromium (headless) through ``/login``.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import APIRouter, FastAPI
from fastapi.staticfiles import StaticFiles
from node_process import Node
from rel_support import wait_until
from support.ports import free_port
from support.served import Served

from dicom_node.api import create_api
from dicom_node.auth import COOKIE, RedactTokenFilter
from dicom_node.db import StateDB
from dicom_node.settings import Settings

TOKEN = "s3cret-Token_with.chars~42"

# every route of the API today, plus those the test adds later (router, static mount)
PROTECTED_GETS = [
    "/studies",
    "/studies/1.2.3",
    "/worklist",
    "/jobs",
    "/deliveries",
    "/deliveries/1",
    "/results/1/sr.dcm",
    "/results/1/heatmap.png",
    "/fhir/DiagnosticReport",
    "/fhir/DiagnosticReport/1",
    "/metrics",
    "/openapi.json",
    "/docs",
    "/",
    "/dicomweb/studies",
    "/later/items",
    "/late-static/app.css",
    "/no-such-route",
]


def _app(tmp: Path, token: str | None) -> tuple[FastAPI, StateDB]:
    settings = Settings(data_dir=tmp / "var", api_token=token)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = StateDB(settings.sqlalchemy_url)
    app = create_api(settings, db)
    # added after create_api, as the other routers are
    later = APIRouter()

    @later.get("/later/items")
    def later_items() -> list[dict[str, str]]:
        return []

    app.include_router(later)
    static = tmp / "static"
    static.mkdir(exist_ok=True)
    (static / "app.css").write_text("body { color: black }\n")
    app.mount("/late-static", StaticFiles(directory=static), name="late-static")
    return app, db


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    app, db = _app(tmp_path, TOKEN)
    server = Served(app)
    yield server
    server.stop()
    db.dispose()


def test_health_is_open(served: Served) -> None:
    response = httpx.get(served.url + "/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


@pytest.mark.parametrize("path", PROTECTED_GETS)
def test_every_route_needs_the_token(served: Served, path: str) -> None:
    response = httpx.get(served.url + path)
    assert response.status_code == 401, path
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json() == {"detail": "API token required"}


def test_post_without_token_is_401_before_any_work(served: Served) -> None:
    response = httpx.post(served.url + "/deliveries/1/retry")
    assert response.status_code == 401
    ok = httpx.post(
        served.url + "/deliveries/1/retry", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert ok.status_code == 404  # past the gate: the delivery does not exist


@pytest.mark.parametrize(
    "header",
    [
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
        "Bearer",
        f"Basic {TOKEN}",
        TOKEN,
        f"Bearer {TOKEN.upper()}",
    ],
)
def test_wrong_token_is_401(served: Served, header: str) -> None:
    response = httpx.get(served.url + "/studies", headers={"Authorization": header})
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_wrong_bearer_token_says_invalid_token(served: Served) -> None:
    response = httpx.get(served.url + "/jobs", headers={"Authorization": "Bearer nope"})
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["www-authenticate"]
    assert response.json() == {"detail": "invalid API token"}


def test_right_token_opens_every_route(served: Served) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}", "Accept": "application/json"}
    expected = {
        "/studies": 200,
        "/worklist": 200,
        "/jobs": 200,
        "/deliveries": 200,
        "/metrics": 200,
        "/openapi.json": 200,
        "/later/items": 200,
        "/late-static/app.css": 200,
        "/deliveries/1": 404,
        "/no-such-route": 404,
    }
    got = {path: httpx.get(served.url + path, headers=headers).status_code for path in expected}
    assert got == expected
    # scheme is case-insensitive
    lower = httpx.get(served.url + "/studies", headers={"Authorization": f"bearer {TOKEN}"})
    assert lower.status_code == 200


def test_cookie_is_accepted(served: Served) -> None:
    with httpx.Client(base_url=served.url, cookies={COOKIE: TOKEN}) as client:
        assert client.get("/studies").status_code == 200
        assert client.get("/late-static/app.css").text.startswith("body")
    with httpx.Client(base_url=served.url, cookies={COOKIE: "wrong"}) as client:
        response = client.get("/studies")
        assert response.status_code == 401
        assert 'error="invalid_token"' in response.headers["www-authenticate"]


def test_login_sets_the_cookie_and_redirects(served: Served) -> None:
    response = httpx.get(served.url + "/login", params={"token": TOKEN})
    assert response.status_code == 303
    assert response.headers["location"] == "/"
    set_cookie = response.headers["set-cookie"]
    assert set_cookie.startswith(f"{COOKIE}=")
    attributes = {part.strip().lower() for part in set_cookie.split(";")}
    assert {"httponly", "samesite=strict", "path=/"} <= attributes
    # the cookie it set opens the API
    cookie_value = response.cookies[COOKIE]
    opened = httpx.get(served.url + "/studies", cookies={COOKIE: cookie_value})
    assert opened.status_code == 200


@pytest.mark.parametrize("params", [{"token": "wrong"}, {}, {"token": ""}])
def test_login_with_a_wrong_token_sets_nothing(served: Served, params: dict[str, str]) -> None:
    response = httpx.get(served.url + "/login", params=params)
    assert response.status_code == 401
    assert "set-cookie" not in response.headers


def test_browser_gets_a_sign_in_page(served: Served) -> None:
    response = httpx.get(served.url + "/", headers={"Accept": "text/html,*/*"})
    assert response.status_code == 401
    assert response.headers["content-type"].startswith("text/html")
    assert "action='/login'" in response.text


def test_without_api_token_nothing_changes(tmp_path: Path) -> None:
    app, db = _app(tmp_path, None)
    server = Served(app)
    try:
        assert httpx.get(server.url + "/studies").status_code == 200
        assert httpx.get(server.url + "/late-static/app.css").status_code == 200
        assert httpx.get(server.url + "/login", params={"token": "x"}).status_code == 404
    finally:
        server.stop()
        db.dispose()


def test_login_token_is_masked_in_the_access_log(tmp_path: Path) -> None:
    app, db = _app(tmp_path, TOKEN)
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    access = logging.getLogger("uvicorn.access")
    handler = Collect()
    access.addHandler(handler)
    previous = access.level
    access.setLevel(logging.INFO)
    server = Served(app, access_log=True)
    try:
        assert httpx.get(server.url + "/login", params={"token": TOKEN}).status_code == 303
        assert httpx.get(server.url + "/login", params={"token": "guess"}).status_code == 401
        wait_until(lambda: len(records) >= 2, 10, "two access-log lines")
    finally:
        server.stop()
        access.removeHandler(handler)
        access.setLevel(previous)
        db.dispose()
    assert any("/login?token=***" in line for line in records), records
    assert not any(TOKEN in line or "guess" in line for line in records), records
    assert any(isinstance(f, RedactTokenFilter) for f in access.filters)


def test_browser_signs_in_through_login(served: Served, tmp_path: Path) -> None:
    """Headless chromium opens /login?token=..., follows the redirect with the cookie it got."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")

    def dump(url: str) -> str:
        done = subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                f"--user-data-dir={tmp_path / 'profile'}",
                "--dump-dom",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    refused = dump(served.url + "/login?token=wrong")
    assert "invalid API token" in refused and "Sign in" in refused
    # the redirect to "/" (the dashboard) carries the cookie /login set: past the gate
    signed_in = dump(served.url + f"/login?token={TOKEN}")
    assert "API token" not in signed_in, signed_in[:500]
    assert "Sign in" not in signed_in


def test_serve_subprocess_requires_the_token(tmp_path: Path) -> None:
    node = Node(tmp_path / "node", pacs_port=free_port(), extra={"api_token": TOKEN})
    node.start()
    try:
        assert node.client.get("/health").status_code == 200
        assert node.client.get("/studies").status_code == 401
        headers = {"Authorization": f"Bearer {TOKEN}"}
        assert node.client.get("/studies", headers=headers).status_code == 200
        assert TOKEN not in node.log_tail(500)
    finally:
        node.stop()
