"""Where the shared data sets live (BUSI, DICOM samples, ...), and skipping without them."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

ENV_VAR = "BREASTCAD_SHARED_DATA"

# tests/support/shared_data.py -> parents[2] is the repository root.
_REPO_ROOT = Path(__file__).resolve().parents[2]


def shared_data_dir() -> Path | None:
    """The shared data directory, or None when it is not available.

    ``$BREASTCAD_SHARED_DATA`` wins when set (and must be a directory); otherwise
    ``<repo>/../shared/data`` is used when it exists.
    """
    configured = os.environ.get(ENV_VAR)
    if configured:
        path = Path(configured).expanduser()
        return path if path.is_dir() else None
    default = _REPO_ROOT.parent / "shared" / "data"
    return default if default.is_dir() else None


def require_shared_data() -> Path:
    """The shared data directory; ``pytest.skip`` with the reason when it is absent."""
    path = shared_data_dir()
    if path is None:
        configured = os.environ.get(ENV_VAR)
        where = (
            f"${ENV_VAR}={configured!r} is not a directory"
            if configured
            else f"${ENV_VAR} is unset and {_REPO_ROOT.parent / 'shared' / 'data'} does not exist"
        )
        pytest.skip(f"shared data sets not available: {where}")
    return path


def busi_png_paths(data_dir: Path, label: str | None = None) -> list[Path]:
    """BUSI PNGs listed in ``busi/labels.csv`` (in its order), optionally of one class.

    ``label`` is ``"benign"``, ``"malignant"`` or ``"normal"``. Raises FileNotFoundError when
    the BUSI folder is missing.
    """
    busi = data_dir / "busi"
    labels = busi / "labels.csv"
    if not labels.is_file():
        raise FileNotFoundError(f"no BUSI labels file at {labels}")
    with labels.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [busi / row["path"] for row in rows if label is None or row["label"] == label]
