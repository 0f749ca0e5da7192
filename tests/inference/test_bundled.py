"""Bundled models: they load, their checksums match, missing modalities are reported."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from inference import (
    Classifier,
    ModelCard,
    ModelNotAvailableError,
    bundled_cards,
    load_bundled,
)
from inference.bundled import BUNDLED_DIR
from inference.card import sha256_file

REQUIRED_CARD_KEYS = (
    "name", "version", "modality", "architecture", "parameters", "input_size", "in_channels",
    "labels", "preprocessing", "training_data", "split", "metrics", "sha256", "date", "machine",
    "ood",
)


def test_ultrasound_and_pathology_models_are_bundled() -> None:
    cards = bundled_cards()
    assert {"US", "SM"} <= {card.modality for card in cards}


@pytest.mark.parametrize("card", bundled_cards(), ids=lambda card: card.name)
def test_every_bundled_model_loads_and_matches_its_card(card: ModelCard) -> None:
    for key in REQUIRED_CARD_KEYS:
        assert key in card.data, f"card {card.name} lacks {key}"
    assert card.weights_path is not None and card.weights_path.is_file()
    assert sha256_file(card.weights_path) == card.sha256
    assert card.ood_path is not None and sha256_file(card.ood_path) == card.ood["sha256"]
    assert card.weights_path.stat().st_size < 10_000_000
    classifier = Classifier.from_card(card)
    assert classifier.ood_scorer is not None
    parameters = sum(p.numel() for p in classifier.module.parameters())
    assert parameters == card.data["parameters"]
    test = card.data["metrics"]["test"]
    assert test["n"] > 0 and 0.0 <= test["accuracy"] <= 1.0


def test_load_bundled_us() -> None:
    classifier = load_bundled("us")
    assert classifier.card.modality == "US"
    assert classifier.card.labels == ("normal", "benign", "malignant")


def test_load_bundled_sm() -> None:
    classifier = load_bundled("SM")
    assert classifier.labels == ("non_idc", "idc")
    assert classifier.card.in_channels == 3 and classifier.card.input_size == 50


@pytest.mark.parametrize("modality", ["CT", "XA"])
def test_missing_modality_raises(modality: str) -> None:
    with pytest.raises(ModelNotAvailableError) as info:
        load_bundled(modality)
    assert isinstance(info.value, LookupError)
    have = ", ".join(sorted({card.modality for card in bundled_cards()}))
    assert str(info.value) == f"no bundled model for modality '{modality}' yet (bundled: {have})"
    assert info.value.modality == modality


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    for path in BUNDLED_DIR.glob("us_busi.*"):
        shutil.copy(path, tmp_path / path.name)
    weights = tmp_path / "us_busi.pt"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_bundled("US", directory=tmp_path)


def test_missing_weights_are_refused(tmp_path: Path) -> None:
    shutil.copy(BUNDLED_DIR / "us_busi.json", tmp_path / "us_busi.json")
    with pytest.raises(ValueError, match="missing"):
        load_bundled("US", directory=tmp_path)
