"""The patient-level split of the IDC patch data set used by the whole-slide code.

``labels.csv`` of ``idc-breast-histopathology`` lists ``path,patient_id,x,y,label``; every patient
is one slide. Patients (never patches) are shuffled with a fixed seed and cut 70/15/15 into
train/val/test, so slides assembled for the aggregator (train patients) and the test fixtures
(test patients) never share a patient with each other.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IDC_FOLDER = "idc-breast-histopathology"
SPLIT_SEED = 20261122
SPLIT_FRACTIONS: tuple[float, float, float] = (0.70, 0.15, 0.15)


@dataclass(frozen=True)
class IdcPatch:
    """One 50x50 patch: its file (relative to the data set folder), patient, position, label."""

    path: str
    patient_id: str
    x: int
    y: int
    label: int


def read_idc_patches(data_dir: Path) -> list[IdcPatch]:
    """All patches listed in ``labels.csv`` of an IDC folder; ``FileNotFoundError`` if absent."""
    labels_csv = data_dir / "labels.csv"
    if not labels_csv.is_file():
        raise FileNotFoundError(f"no labels.csv in {data_dir}")
    with labels_csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    patches = [
        IdcPatch(
            path=row["path"],
            patient_id=row["patient_id"],
            x=int(row["x"]),
            y=int(row["y"]),
            label=int(row["label"]),
        )
        for row in rows
    ]
    bad = {p.label for p in patches} - {0, 1}
    if bad:
        raise ValueError(f"unknown labels in {labels_csv}: {sorted(bad)}")
    return patches


def split_patients(
    patient_ids: set[str] | list[str], seed: int = SPLIT_SEED
) -> dict[str, list[str]]:
    """Patients -> ``{"train": [...], "val": [...], "test": [...]}``, deterministic for a seed."""
    ordered = sorted(set(patient_ids), key=lambda pid: (len(pid), pid))
    order = np.random.default_rng(seed).permutation(len(ordered))
    n_test = int(round(SPLIT_FRACTIONS[2] * len(ordered)))
    n_val = int(round(SPLIT_FRACTIONS[1] * len(ordered)))
    split: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for rank, index in enumerate(order):
        name = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
        split[name].append(ordered[index])
    return {name: sorted(ids, key=lambda pid: (len(pid), pid)) for name, ids in split.items()}


def patches_by_split(patches: list[IdcPatch], seed: int = SPLIT_SEED) -> dict[str, list[IdcPatch]]:
    """The patches of each split's patients."""
    split = split_patients({p.patient_id for p in patches}, seed)
    where = {pid: name for name, ids in split.items() for pid in ids}
    grouped: dict[str, list[IdcPatch]] = defaultdict(list)
    for patch in patches:
        grouped[where[patch.patient_id]].append(patch)
    return {name: grouped.get(name, []) for name in split}
