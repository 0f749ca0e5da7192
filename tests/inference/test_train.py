"""The training entry point, end to end on a tiny synthetic data set (seconds, not minutes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from inference import Classifier, ModelCard
from inference.card import sha256_file
from inference.datasets import BUSI_LABELS
from inference.train import train


def _tiny_busi(root: Path, per_label: int = 12) -> Path:
    rng = np.random.default_rng(0)
    rows = ["path,label,dup_group,dup_group_size"]
    for index, label in enumerate(BUSI_LABELS):
        (root / label).mkdir(parents=True)
        for n in range(per_label):
            pixels = rng.integers(0, 60, size=(48, 48), dtype=np.uint8)
            pixels[8 + 8 * index : 20 + 8 * index, 10:30] = 200  # a class-dependent "lesion"
            name = f"{label}/{label} ({n}).png"
            Image.fromarray(pixels).convert("RGB").save(root / name)
            rows.append(f"{name},{label},{label}{n // 2},2")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_train_writes_a_loadable_model(tmp_path: Path) -> None:
    data = _tiny_busi(tmp_path / "busi")
    out = tmp_path / "out"
    card_path = train("US", data, out, epochs=2, seed=1, size=32, batch_size=8, patience=5)
    for name in ("us_busi.pt", "us_busi.json", "us_busi_curves.png", "us_busi_confusion.png"):
        assert (out / name).is_file(), name
    card = ModelCard.from_file(card_path)
    assert card.sha256 == sha256_file(out / "us_busi.pt")
    raw = json.loads(card_path.read_text())
    assert raw["split"]["seed"] == 1
    assert raw["split"]["test"]["images"] > 0
    assert "accuracy" in raw["metrics"]["test"]
    prediction = Classifier.from_card(card).predict(np.zeros((40, 50), dtype=np.uint8))
    assert prediction.heatmap.shape == (40, 50)
