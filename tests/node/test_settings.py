"""The configuration contract: YAML file, BREASTCAD_* overrides, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.settings import ConfigError, load_settings

CONTRACT = """
ae_title: BREASTCAD
dicom_port: 11112
api_port: 8000
data_dir: ./var
broker_url: null
embedded_worker: true
database_url: null
series_quiet_seconds: 5
allowed_calling_aets: []
destinations:
  pacs: {host: 127.0.0.1, port: 4242, ae_title: ORTHANC}
routes:
  - send_to: [pacs]
"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("BREASTCAD_") and key != "BREASTCAD_SHARED_DATA":
            monkeypatch.delenv(key)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_contract_keys_load(tmp_path: Path) -> None:
    s = load_settings(_write(tmp_path, CONTRACT))
    assert s.ae_title == "BREASTCAD" and s.dicom_port == 11112 and s.api_port == 8000
    assert s.broker_url is None and not s.distributed and s.embedded_worker
    assert s.sqlalchemy_url.startswith("sqlite:///") and s.sqlalchemy_url.endswith("state.db")
    assert s.destinations["pacs"].port == 4242
    assert s.routes[0].when is None and s.routes[0].send_to == ["pacs"]


def test_environment_beats_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BREASTCAD_DICOM_PORT", "11999")
    monkeypatch.setenv("BREASTCAD_EMBEDDED_WORKER", "false")
    monkeypatch.setenv("BREASTCAD_BROKER_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("BREASTCAD_DATABASE_URL", "postgresql://u@h:5432/db")
    s = load_settings(_write(tmp_path, CONTRACT))
    assert s.dicom_port == 11999 and s.embedded_worker is False
    assert s.distributed and s.celery_broker_url == "redis://127.0.0.1:6379/0"
    assert s.sqlalchemy_url == "postgresql+psycopg://u@h:5432/db"


def test_config_from_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BREASTCAD_CONFIG", str(_write(tmp_path, "dicom_port: 4000\n")))
    assert load_settings().dicom_port == 4000


def test_unknown_key_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dicom_prot"):
        load_settings(_write(tmp_path, "dicom_prot: 1\n"))


def test_route_to_unknown_destination_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown destination"):
        load_settings(_write(tmp_path, "routes:\n  - send_to: [nowhere]\n"))


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(_write(tmp_path, "a: [\n"))
