"""Fixtures for the inference tests: the shared data folder (skip when it is absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from inference.paths import SHARED_DATA_ENV, shared_data_dir


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(
            f"{what} not found at {path}: set {SHARED_DATA_ENV} or provide <repo>/../shared/data"
        )
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return _require(shared_data_dir(), "shared data folder")


@pytest.fixture(scope="session")
def busi_dir(shared_data: Path) -> Path:
    return _require(shared_data / "busi" / "labels.csv", "BUSI labels.csv").parent


@pytest.fixture(scope="session")
def dicom_samples(shared_data: Path) -> Path:
    return _require(shared_data / "dicom-samples", "DICOM sample folder")


@pytest.fixture(scope="session")
def idc_dir(shared_data: Path) -> Path:
    return _require(
        shared_data / "idc-breast-histopathology" / "labels.csv", "IDC patches labels.csv"
    ).parent


@pytest.fixture(scope="session")
def mias_dir(shared_data: Path) -> Path:
    return _require(shared_data / "mini-mias" / "labels.csv", "mini-MIAS labels.csv").parent
