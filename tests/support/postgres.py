"""Fresh PostgreSQL databases for tests (127.0.0.1:5432, trust auth), dropped afterwards."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"


def fresh_database(prefix: str = "breastcad") -> Iterator[str]:
    """Create a database named ``<prefix>_<random>``, yield its URL, drop it; skip the test
    with the reason when no PostgreSQL answers."""
    psycopg = pytest.importorskip("psycopg")
    name = f"{prefix}_{secrets.token_hex(4)}"
    try:
        with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as exc:
        pytest.skip(f"no PostgreSQL reachable at {ADMIN_URL}: {exc}")
    yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
