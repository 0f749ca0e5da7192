"""The training data sets (BUSI, IDC patches, mini-MIAS): labels, the group-level split and a
torch Dataset of preprocessed images held in memory.

Every sample has a ``group`` (BUSI: near-duplicate group; IDC and mini-MIAS: patient) and splits
never cut a group.
"""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Compose
from PIL import Image
from torch.utils.data import Dataset

from inference.transforms import normalize_transform, preprocess_transform

BUSI_LABELS: tuple[str, ...] = ("normal", "benign", "malignant")
IDC_LABELS: tuple[str, ...] = ("non_idc", "idc")
MIAS_LABELS: tuple[str, ...] = ("normal", "benign", "malignant")
SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    """One labelled image; ``path`` is relative to the data set folder."""

    path: str
    label: str
    group: str


def _rows(data_dir: Path) -> list[dict[str, str]]:
    labels_csv = data_dir / "labels.csv"
    if not labels_csv.is_file():
        raise FileNotFoundError(f"no labels.csv in {data_dir}")
    with labels_csv.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _checked(samples: list[Sample], labels: Sequence[str], where: Path) -> list[Sample]:
    unknown = {s.label for s in samples} - set(labels)
    if unknown:
        raise ValueError(f"unknown labels in {where / 'labels.csv'}: {sorted(unknown)}")
    return samples


def read_labels(data_dir: Path) -> list[Sample]:
    """BUSI ``labels.csv`` (``path,label,dup_group,dup_group_size``); group = dup_group."""
    samples = [
        Sample(path=r["path"], label=r["label"], group=r["dup_group"]) for r in _rows(data_dir)
    ]
    return _checked(samples, BUSI_LABELS, data_dir)


def read_idc(data_dir: Path) -> list[Sample]:
    """IDC patches ``labels.csv`` (``path,patient_id,x,y,label``); 1 = idc; group = patient."""
    samples = [
        Sample(path=r["path"], label=IDC_LABELS[int(r["label"])], group=r["patient_id"])
        for r in _rows(data_dir)
    ]
    return _checked(samples, IDC_LABELS, data_dir)


def read_mias(data_dir: Path) -> list[Sample]:
    """mini-MIAS ``labels.csv`` (one row per abnormality); one sample per image; group = patient."""
    by_path: dict[str, Sample] = {}
    for r in _rows(data_dir):
        by_path.setdefault(
            r["path"], Sample(path=r["path"], label=r["image_label"], group=r["patient_id"])
        )
    return _checked(sorted(by_path.values(), key=lambda s: s.path), MIAS_LABELS, data_dir)


def split_by_group(
    samples: Sequence[Sample],
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.70, 0.15, 0.15),
    labels: Sequence[str] = BUSI_LABELS,
) -> dict[str, list[Sample]]:
    """Split samples into train/val/test by ``group`` (never by image), deterministically.

    Groups are stratified by their majority label (ties broken by ``labels`` order): within
    each stratum the sorted
    groups are shuffled with ``seed`` and cut by ``fractions``. The same samples and seed always
    give the same split, whatever the input order.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1: {fractions}")
    by_group: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_group[sample.group].append(sample)
    label_rank = {label: i for i, label in enumerate(labels)}
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


def pad_to(image: np.ndarray, size: int, value: int = 255) -> np.ndarray:
    """Pad an (H, W, C) image at the bottom and right to at least ``size`` x ``size`` with
    ``value`` (white: the background of an H&E slide), as the slide's edge patches are cut."""
    height, width = image.shape[:2]
    if height >= size and width >= size:
        return image
    padded = np.full((max(size, height), max(size, width), *image.shape[2:]), value, image.dtype)
    padded[:height, :width] = image
    return padded


class ImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """Preprocessed images held in memory as (C, S, S) tensors in [0, 1].

    Each item is ``(augment(image) -> normalize, label index)``; ``augment`` is optional.
    """

    def __init__(
        self,
        data_dir: Path,
        samples: Sequence[Sample],
        preprocess: Compose,
        labels: Sequence[str],
        augment: Compose | None = None,
        normalize: Compose | None = None,
        progress: Callable[[int], object] | None = None,
        loader: Callable[[Path], np.ndarray] = load_image,
    ) -> None:
        self.samples = list(samples)
        images: list[torch.Tensor] = []
        for sample in self.samples:
            images.append(torch.as_tensor(preprocess(loader(data_dir / sample.path))))
            if progress is not None:
                progress(1)
        self.images = images
        self.targets = [list(labels).index(s.label) for s in self.samples]
        self.augment = augment
        self.normalize = normalize if normalize is not None else normalize_transform()

    def __len__(self) -> int:
        return len(self.samples)

    def channel_statistics(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and standard deviation of the (un-augmented) images."""
        stacked = torch.stack(self.images)
        mean = stacked.mean(dim=(0, 2, 3))
        std = stacked.std(dim=(0, 2, 3)).clamp_min(1e-6)
        return [float(v) for v in mean], [float(v) for v in std]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        # A copy: MONAI's NormalizeIntensity works in place, and the stored image must stay the
        # preprocessed original (re-normalising it every epoch silently corrupted validation).
        image = self.images[index].clone()
        if self.augment is not None:
            image = torch.as_tensor(self.augment(image)).clamp(0.0, 1.0)
        return torch.as_tensor(self.normalize(image)).as_subclass(torch.Tensor).float(), \
            self.targets[index]


class BusiDataset(ImageDataset):
    """BUSI images at ``size`` px grey (kept for the tests and scripts of the first model)."""

    def __init__(
        self,
        data_dir: Path,
        samples: Sequence[Sample],
        size: int,
        augment: Compose | None = None,
        labels: Sequence[str] = BUSI_LABELS,
    ) -> None:
        super().__init__(data_dir, samples, preprocess_transform(size), labels, augment)


@dataclass(frozen=True)
class Lesion:
    """One annotated mini-MIAS abnormality: centre (row from the TOP, column) and radius in
    pixels of the 1024 x 1024 image, and its severity ("B" or "M")."""

    row: float
    col: float
    radius: float
    severity: str
    abnormality: str


def read_mias_lesions(data_dir: Path) -> dict[str, list[Lesion]]:
    """The located abnormalities of each mini-MIAS image (``path`` -> lesions; [] for normal
    images and for the widely distributed calcifications that have no centre).

    MIAS measures y from the BOTTOM of the image (SOURCE.md): row = height - y.
    """
    lesions: dict[str, list[Lesion]] = {}
    for r in _rows(data_dir):
        found = lesions.setdefault(r["path"], [])
        if r["abnormality"] == "NORM" or not (r["x"].isdigit() and r["y"].isdigit()):
            continue  # normal, or no centre (e.g. "*NOTE 3*": calcifications all over)
        with Image.open(data_dir / r["path"]) as image:
            height = image.height
        found.append(Lesion(
            row=float(height - int(r["y"])), col=float(int(r["x"])),
            radius=float(r["radius"]) if r["radius"].isdigit() else 8.0,
            severity=r["severity"] or "B",
            abnormality=r["abnormality"],
        ))
    return lesions
