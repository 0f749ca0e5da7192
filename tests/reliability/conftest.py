"""Fixtures for the reliability tests: a private Redis we may kill, a private PostgreSQL database.

Everything here is real: ``redis-server`` on a free port (``--save "" --appendonly no``, so a
restart loses every message, as a broker without persistence would), PostgreSQL at
127.0.0.1:5432 (trust auth, database ``test``), ``breastcad serve``/``worker`` subprocesses
(``tests/e2e/node_process.py``). Tests skip with the reason when a piece is absent.
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_E2E = str(Path(__file__).resolve().parents[1] / "e2e")
if _E2E not in sys.path:
    sys.path.insert(0, _E2E)

from rel_support import RedisServer  # noqa: E402

POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    pytest.importorskip("redis")
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def postgres_db() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    psycopg = pytest.importorskip("psycopg")
    name = f"breastcad_rel_{secrets.token_hex(4)}"
    try:
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as exc:
        pytest.skip(f"no PostgreSQL reachable at {POSTGRES_ADMIN}: {exc}")
    yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def soak() -> bool:
    """BREASTCAD_SOAK=1 runs the long variants (bigger load, more fuzz cases)."""
    import os

    return os.environ.get("BREASTCAD_SOAK") == "1"
