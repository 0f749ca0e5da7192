"""Fixtures for the reliability tests: a private Redis we may kill, a private PostgreSQL database.

Everything here is real: ``redis-server`` on a free port (``--save "" --appendonly no``, so a
restart loses every message, as a broker without persistence would), PostgreSQL at
127.0.0.1:5432 (trust auth, database ``test``), ``breastcad serve``/``worker`` subprocesses
(``tests/e2e/node_process.py``). Tests skip with the reason when a piece is absent.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_E2E = str(Path(__file__).resolve().parents[1] / "e2e")
if _E2E not in sys.path:
    sys.path.insert(0, _E2E)

from rel_support import RedisServer  # noqa: E402


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    pytest.importorskip("redis")
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def soak() -> bool:
    """BREASTCAD_SOAK=1 runs the long variants (bigger load, more fuzz cases)."""
    import os

    return os.environ.get("BREASTCAD_SOAK") == "1"
