"""An untrained MG classifier written as a model directory (``model_dirs``), for tests.

Until a bundled MG model lands, the MG pipeline is checked with an untrained network of the
bundled architecture: orientation, per-breast groups, references, validity, never the verdict.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from inference.card import sha256_file
from inference.networks import BusiCNN


def write_untrained_mg_model(folder: Path) -> Path:
    """Card ``mg_untrained.json`` + weights in ``folder`` (seeded: always the same weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    params: dict[str, Any] = {"in_channels": 1, "num_classes": 3, "widths": [8, 16, 32, 64],
                              "blocks_per_stage": 1, "dropout": 0.0, "stem_pool": True}
    torch.manual_seed(0)
    torch.save(BusiCNN(**params).state_dict(), folder / "mg_untrained.pt")
    card = {
        "name": "mg_untrained_test", "version": "0.0.1", "modality": "MG",
        "architecture": "BusiCNN", "architecture_params": params, "input_size": 128,
        "in_channels": 1, "labels": ["normal", "benign", "malignant"],
        # as the MG training recipe (inference/train.py): crop to the breast first
        "preprocessing_params": {"breast_crop": True},
        "weights": "mg_untrained.pt", "sha256": sha256_file(folder / "mg_untrained.pt"),
        "intended_use": "tests only: untrained",
    }
    (folder / "mg_untrained.json").write_text(json.dumps(card))
    return folder
