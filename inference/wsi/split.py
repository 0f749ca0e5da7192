"""The patient-level split of the IDC patch data set, as the SM patch model was trained on it.

Every patient of ``idc-breast-histopathology`` is one slide. The split is the lead's
(``inference.datasets.split_by_group`` of ``read_idc``: by patient, stratified by the patient's
majority label, 70/15/15) with the seed written in the bundled SM model's card (``split.seed``;
0, the training default, when no SM model is bundled). So the aggregator trains on bags of TRAIN
patients and the test fixtures use TEST patients the patch model never saw.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from inference.bundled import bundled_cards
from inference.datasets import IDC_LABELS, Sample, split_by_group

IDC_FOLDER = "idc-breast-histopathology"
SPLIT_FRACTIONS: tuple[float, float, float] = (0.70, 0.15, 0.15)


def split_seed() -> int:
    """The split seed of the bundled SM patch model's card (0 when there is none)."""
    for card in bundled_cards():
        if card.modality == "SM":
            split = card.data.get("split") or {}
            return int(split.get("seed", 0)) if isinstance(split, dict) else 0
    return 0


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
    patches: list[IdcPatch], seed: int | None = None
) -> dict[str, list[str]]:
    """Patient IDs of each split: ``{"train": [...], "val": [...], "test": [...]}``."""
    samples = [
        Sample(path=p.path, label=IDC_LABELS[p.label], group=p.patient_id) for p in patches
    ]
    split = split_by_group(
        samples, seed=split_seed() if seed is None else seed, labels=IDC_LABELS
    )
    return {
        name: sorted({s.group for s in members}, key=lambda pid: (len(pid), pid))
        for name, members in split.items()
    }


def patches_by_split(
    patches: list[IdcPatch], seed: int | None = None
) -> dict[str, list[IdcPatch]]:
    """The patches of each split's patients."""
    split = split_patients(patches, seed)
    where = {pid: name for name, ids in split.items() for pid in ids}
    grouped: dict[str, list[IdcPatch]] = defaultdict(list)
    for patch in patches:
        grouped[where[patch.patient_id]].append(patch)
    return {name: grouped.get(name, []) for name in split}
