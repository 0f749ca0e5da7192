"""The BUSI breast-ultrasound data set: labels, the group-level split, and a torch Dataset."""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Compose
from PIL import Image
from torch.utils.data import Dataset

from inference.transforms import normalize_transform, preprocess_transform

BUSI_LABELS: tuple[str, ...] = ("normal", "benign", "malignant")
SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    """One labelled image; ``path`` is relative to the data set folder."""

    path: str
    label: str
    group: str


def read_labels(data_dir: Path) -> list[Sample]:
    """Read ``labels.csv`` (``path,label,dup_group,dup_group_size``) of a BUSI folder."""
    labels_csv = data_dir / "labels.csv"
    if not labels_csv.is_file():
        raise FileNotFoundError(f"no labels.csv in {data_dir}")
    with labels_csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    samples = [Sample(path=r["path"], label=r["label"], group=r["dup_group"]) for r in rows]
    unknown = {s.label for s in samples} - set(BUSI_LABELS)
    if unknown:
        raise ValueError(f"unknown labels in {labels_csv}: {sorted(unknown)}")
    return samples


def split_by_group(
    samples: Sequence[Sample],
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.70, 0.15, 0.15),
) -> dict[str, list[Sample]]:
    """Split samples into train/val/test by ``group`` (never by image), deterministically.

    Groups are stratified by their majority label (ties broken by label order): within each
    stratum the sorted groups are shuffled with ``seed`` and cut by ``fractions``. The same
    samples and seed always give the same split, whatever the input order.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1: {fractions}")
    by_group: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_group[sample.group].append(sample)
    label_rank = {label: i for i, label in enumerate(BUSI_LABELS)}
    strata: dict[str, list[str]] = defaultdict(list)
    for group, members in by_group.items():
        counts = Counter(m.label for m in members)
        majority = min(counts, key=lambda lab: (-counts[lab], label_rank.get(lab, len(label_rank))))
        strata[majority].append(group)
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    for stratum in sorted(strata):
        groups = sorted(strata[stratum])
        order = rng.permutation(len(groups))
        n = len(groups)
        n_test = int(round(fractions[2] * n))
        n_val = int(round(fractions[1] * n))
        for rank, index in enumerate(order):
            if rank < n_test:
                assignment[groups[index]] = "test"
            elif rank < n_test + n_val:
                assignment[groups[index]] = "val"
            else:
                assignment[groups[index]] = "train"
    split: dict[str, list[Sample]] = {name: [] for name in SPLITS}
    for sample in sorted(samples, key=lambda s: s.path):
        split[assignment[sample.group]].append(sample)
    return split


def load_image(path: Path) -> np.ndarray:
    """An image file as uint8 RGB (H, W, 3)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


class BusiDataset(Dataset[tuple[torch.Tensor, int]]):
    """Preprocessed BUSI images held in memory as (1, S, S) tensors in [0, 1].

    Each item is ``(augment(image) -> normalize, label index)``; ``augment`` is optional.
    """

    def __init__(
        self,
        data_dir: Path,
        samples: Sequence[Sample],
        size: int,
        augment: Compose | None = None,
        labels: Sequence[str] = BUSI_LABELS,
    ) -> None:
        preprocess = preprocess_transform(size)
        self.samples = list(samples)
        self.images = [
            torch.as_tensor(preprocess(load_image(data_dir / s.path))) for s in self.samples
        ]
        self.targets = [list(labels).index(s.label) for s in self.samples]
        self.augment = augment
        self.normalize = normalize_transform()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.augment is not None:
            image = torch.as_tensor(self.augment(image)).clamp(0.0, 1.0)
        return torch.as_tensor(self.normalize(image)).float(), self.targets[index]
