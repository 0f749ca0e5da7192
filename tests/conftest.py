"""Shared fixtures. Puts ``tests/`` on sys.path so tests can ``import support``.

Failure logs: when a test fails, every fixture value it uses that has a ``log_tail()`` method
(OrthancServer, and any process wrapper following the same convention) gets its log tail
attached to the failure report as a section named ``log of fixture <name>``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

# Before anything imports torch: its OpenMP threads must sleep, not spin, while they wait.
# Spinning threads of one test process starve the node and worker subprocesses (and the
# other pytest-xdist worker) on a 2-core machine: CPU-bound tests ran 5-19x slower under
# contention with the default policy.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_TESTS_DIR = str(Path(__file__).resolve().parent)
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)
# With tests/ on sys.path (pytest's default "prepend" import mode puts it there for this
# conftest anyway), the folders tests/reports, tests/inference, ... are namespace-package
# candidates named like the project's packages. The editable install's finder runs after
# sys.path's, so `import reports` would become that empty namespace. A regular package
# anywhere on sys.path beats a namespace portion, so the repository root is put on it too.
if _REPO_ROOT not in sys.path:
    sys.path.append(_REPO_ROOT)

from support.orthanc import OrthancServer, require_orthanc  # noqa: E402
from support.postgres import fresh_database  # noqa: E402
from support.shared_data import require_shared_data  # noqa: E402


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak", action="store_true", default=False,
        help="run the long reliability variants (same as BREASTCAD_SOAK=1): 5x the load test, "
        "10x the C-STORE and API fuzz cases",
    )


def pytest_configure(config: pytest.Config) -> None:
    # before the test modules are imported: they read BREASTCAD_SOAK for their case counts
    if config.getoption("--soak"):
        os.environ["BREASTCAD_SOAK"] = "1"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        funcargs = getattr(item, "funcargs", {})
        for name, value in funcargs.items():
            log_tail = getattr(value, "log_tail", None)
            if callable(log_tail):
                report.sections.append((f"log of fixture {name}", str(log_tail(200))))
    return report


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data directory (BUSI, dicom-samples, ...); skips when absent."""
    return require_shared_data()


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    """A fresh private Orthanc (AET ORTHANC) for one test; its folder and log in tmp_path."""
    require_orthanc()
    with OrthancServer(workdir=tmp_path / "orthanc") as server:
        yield server


@pytest.fixture(scope="module")
def orthanc_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """One private Orthanc shared by a test module (call ``.clear()`` to empty it)."""
    require_orthanc()
    with OrthancServer(workdir=tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@pytest.fixture
def postgres_db() -> Iterator[str]:
    """A fresh PostgreSQL database (on 127.0.0.1:5432, trust auth) for one test, dropped after."""
    yield from fresh_database()
