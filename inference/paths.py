"""Where the shared (not version-controlled) data lives."""

from __future__ import annotations

import os
from pathlib import Path

SHARED_DATA_ENV = "BREASTCAD_SHARED_DATA"
REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"


def shared_data_dir() -> Path:
    """``$BREASTCAD_SHARED_DATA`` if set, else ``<repo>/../shared/data`` (it may not exist)."""
    override = os.environ.get(SHARED_DATA_ENV)
    if override:
        return Path(override).expanduser().resolve()
    return (REPO_ROOT.parent / "shared" / "data").resolve()
