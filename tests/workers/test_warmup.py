"""A worker loads its models before its first task (workers/warmup.py)."""

from __future__ import annotations

from pathlib import Path

from dicom_node.db import StateDB
from dicom_node.settings import load_settings
from inference import bundled_cards
from workers.tasks import WorkerContext
from workers.warmup import warm_up


def test_warm_up_loads_every_analysed_modality_that_has_a_model(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, analysed_modalities=["US", "SM", "MG", "CT"])
    db = StateDB(settings.sqlalchemy_url)
    try:
        context = WorkerContext(settings, db)
        seconds = warm_up(context)
        with_model = {card.modality for card in bundled_cards()}
        assert set(seconds) == (with_model & {"US", "SM", "MG", "CT"}) | {"highdicom"}
        assert "US" in seconds and all(s > 0 for s in seconds.values())
        # the first task finds the loaded classifier instead of loading it again
        assert context.classifier("US") is context.classifier("US")
        assert set(context._models) == set(seconds) - {"highdicom"}
    finally:
        db.dispose()
