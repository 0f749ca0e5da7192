"""API fuzzing: schemathesis generates requests from the app's own OpenAPI schema.

The app (``create_api``, with ``api_token`` set) runs on a real uvicorn on localhost over a real
state DB, SQLite and PostgreSQL (the latter skipped with the reason when it is not reachable),
holding one study with a series, an instance, a finished job, a result (its SR and heatmap files
exist) and a failed delivery, so that the generated ids and UIDs also reach the code paths behind
a found row. Every generated request (path and query parameters, bodies, headers the schema
declares) must get an answer below 500, and the node must still answer afterwards.
Up to 800 requests per backend, spread over the operations; ``BREASTCAD_SOAK=1`` up to 8,000.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import secrets
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from support.ports import free_port
from support.postgres import fresh_database
from support.served import Served

from dicom_node.api import create_api
from dicom_node.db import (
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Result,
    Series,
    SeriesState,
    StateDB,
    Study,
)
from dicom_node.settings import Settings

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402

SOAK = os.environ.get("BREASTCAD_SOAK") == "1"
# generated requests per backend, spread over every operation and both generation modes
REQUESTS_PER_BACKEND = 8000 if SOAK else 800
TOKEN = "fuzz-" + secrets.token_hex(8)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = "1.2.826.0.1.3680043.8.498.2"

# answers seen, per backend and status (printed at the end of the module for the docs)
SEEN: dict[str, dict[int, int]] = {}


def _seed(db: StateDB, results_dir: Path) -> None:
    job_dir = results_dir / "job-1"
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "sr.dcm").write_bytes(b"\0" * 132 + b"DICM")
    (job_dir / "heatmap-1.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    now = datetime.utcnow()
    with db.session() as session:
        session.add(
            Study(
                study_instance_uid=STUDY,
                patient_id="FUZZ-1",
                accession_number="A1",
                study_date="20260101",
                study_description="fuzz",
            )
        )
        session.flush()
        session.add(
            Series(
                series_instance_uid=SERIES,
                study_instance_uid=STUDY,
                modality="US",
                calling_ae="FUZZ",
                state=SeriesState.COMPLETE,
            )
        )
        session.flush()
        session.add(
            Instance(
                sop_instance_uid=SERIES + ".1",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.6.1",
                series_instance_uid=SERIES,
                study_instance_uid=STUDY,
                instance_number=1,
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                path=f"{STUDY}/{SERIES}/{SERIES}.1.dcm",
                size=1,
                calling_ae="FUZZ",
            )
        )
        job = Job(
            series_instance_uid=SERIES,
            state=JobState.DONE,
            attempts=1,
            instance_count=1,
            finished_at=now,
        )
        session.add(job)
        session.flush()
        result = Result(
            job_id=job.id,
            series_instance_uid=SERIES,
            study_instance_uid=STUDY,
            modality="US",
            label="malignant",
            probability=0.8,
            probabilities={"benign": 0.1, "malignant": 0.8, "normal": 0.1},
            model_name="fuzz",
            model_version="1",
            model_sha256="0" * 64,
            sr_sop_instance_uid=SERIES + ".9",
            suspicion=0.8,
            priority=True,
            files={"sr": "job-1/sr.dcm", "png": ["job-1/heatmap-1.png"], "sc": []},
        )
        session.add(result)
        session.flush()
        session.add(
            Delivery(
                result_id=result.id,
                destination="pacs",
                state=DeliveryState.FAILED,
                attempts=5,
                last_error="refused",
            )
        )
        session.commit()


def _postgres_url() -> Iterator[str]:
    yield from fresh_database("breastcad_fuzz")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> Iterator[str | None]:
    if request.param == "sqlite":
        yield None
    else:
        yield from _postgres_url()


@pytest.fixture(scope="module")
def served(backend: str | None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("api-fuzz")
    config = Settings(
        data_dir=root / "var",
        database_url=backend,
        api_token=TOKEN,
        destinations={"pacs": {"host": "127.0.0.1", "port": free_port(), "ae_title": "PACS"}},
    )
    config.data_dir.mkdir(parents=True, exist_ok=True)
    db = StateDB(config.sqlalchemy_url)
    _seed(db, config.results_dir)
    server = Served(create_api(config, db))
    SEEN.setdefault("postgresql" if backend else "sqlite", {})
    yield server
    server.stop()
    db.dispose()


@contextlib.contextmanager
def ieee_subnormals() -> Iterator[None]:
    """Run with the default floating-point environment, then put the previous one back.

    A native library loaded earlier in a full test session (one compiled with -ffast-math) can
    leave flush-to-zero set on the main thread; hypothesis then refuses to generate floats
    ("Got allow_subnormal=True, but we can't represent subnormal floats"), which is what
    schemathesis asks of it for number parameters. Seen in the full suite, never alone.
    """
    if sys.float_info.min / 2 > 0:
        yield
        return
    libm_name = ctypes.util.find_library("m")
    if libm_name is None:
        pytest.skip("flush-to-zero is set and libm is not found to reset it")
    libm = ctypes.CDLL(libm_name)
    saved = ctypes.create_string_buffer(64)  # fenv_t is 32 bytes on x86-64 glibc
    if libm.fegetenv(saved) != 0:
        pytest.skip("flush-to-zero is set and fegetenv failed")
    libm.fesetenv(ctypes.c_void_p(-1))  # glibc's FE_DFL_ENV
    try:
        assert sys.float_info.min / 2 > 0, "could not restore IEEE subnormals"
        yield
    finally:
        libm.fesetenv(saved)


def _operations(served: Served) -> list[Any]:
    loaded = schemathesis.openapi.from_url(served.url + "/openapi.json", headers=AUTH)
    return [result.ok() for result in loaded.get_all_operations()]


@pytest.mark.timeout(1800)  # a few minutes on an idle 2-core machine; more when it is shared
def test_no_request_gets_a_server_error(served: Served, backend: str | None) -> None:
    """Valid (positive) and schema-violating (negative) requests for every operation: no 5xx."""
    name = "postgresql" if backend else "sqlite"
    counts = SEEN.setdefault(name, {})
    operations = _operations(served)
    assert len(operations) >= 10, [op.label for op in operations]
    per_case = max(3, REQUESTS_PER_BACKEND // (2 * len(operations)))
    failures: list[str] = []
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=per_case,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                database=None,
            )
            def fuzz(case: Any) -> None:
                response = case.call(headers=AUTH, timeout=30)
                counts[response.status_code] = counts.get(response.status_code, 0) + 1
                assert response.status_code < 500, (
                    f"{case.method} {case.formatted_path} query={case.query} -> "
                    f"{response.status_code}: {response.text[:300]}"
                )

            try:
                with ieee_subnormals():
                    fuzz()
            except AssertionError as exc:
                failures.append(f"{operation.label} ({mode.value}): {exc}")
            except Unsatisfiable:
                pass  # e.g. no negative input exists for an operation without parameters
    total = sum(counts.values())
    print(f"api fuzz ({name}): {len(operations)} operations, {total} requests, {counts}")
    assert not failures, "\n".join(failures)


def test_node_still_serves_after_the_fuzz(served: Served, backend: str | None) -> None:
    assert httpx.get(served.url + "/health").json()["status"] == "ok"
    studies = httpx.get(served.url + "/studies", headers=AUTH).json()
    assert [s["study_instance_uid"] for s in studies["items"]] == [STUDY]
    result = httpx.get(served.url + "/fhir/DiagnosticReport/1", headers=AUTH)
    assert result.status_code == 200
    counts = SEEN.get("postgresql" if backend else "sqlite", {})
    assert sum(counts.values()) > 0, "the fuzz test did not run before this one"


@pytest.mark.parametrize(
    ("method", "path", "sqlite", "postgresql"),
    [
        ("GET", "/deliveries/9223372036854775808", 422, 422),
        ("POST", "/deliveries/9223372036854775808/retry", 422, 422),
        ("GET", "/results/9223372036854775808/sr.dcm", 422, 422),
        ("GET", "/fhir/DiagnosticReport/2147483648", 404, 422),
        ("GET", "/studies/1.2%003", 404, 422),
        ("GET", "/deliveries/1", 200, 200),
    ],
)
def test_values_the_state_db_cannot_hold_are_422(
    served: Served, backend: str | None, method: str, path: str, sqlite: int, postgresql: int
) -> None:
    """The 5xx the fuzzer found first (int beyond the DB's range, NUL in a PostgreSQL string)."""
    response = httpx.request(method, served.url + path, headers=AUTH)
    assert response.status_code == (postgresql if backend else sqlite), response.text
    if response.status_code == 422:
        assert "state DB" in response.json()["detail"]
