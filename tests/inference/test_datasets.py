"""The in-memory training data set: reading an item never changes the stored image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from inference.datasets import ImageDataset, Sample, pad_to
from inference.transforms import normalize_transform, preprocess_transform


def test_items_are_stable_with_fixed_normalisation(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (50, 50, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    dataset = ImageDataset(
        tmp_path, [Sample("a.png", "idc", "p1")], preprocess_transform(50, 3), ("non_idc", "idc"),
        normalize=normalize_transform([0.5, 0.5, 0.5], [0.25, 0.25, 0.25]),
    )
    stored = dataset.images[0].clone()
    first, label = dataset[0]
    second, _ = dataset[0]
    assert label == 1
    torch.testing.assert_close(first, second)
    torch.testing.assert_close(dataset.images[0], stored)
    torch.testing.assert_close(first, (stored - 0.5) / 0.25)


def test_edge_patches_are_padded_white() -> None:
    patch = np.zeros((20, 50, 3), dtype=np.uint8)
    padded = pad_to(patch, 50)
    assert padded.shape == (50, 50, 3)
    assert (padded[:20] == 0).all() and (padded[20:] == 255).all()
    assert pad_to(np.zeros((50, 50, 3), np.uint8), 50).shape == (50, 50, 3)
