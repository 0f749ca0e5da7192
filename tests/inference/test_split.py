"""The group-level split of BUSI."""

from __future__ import annotations

import random
from pathlib import Path

from inference.datasets import BUSI_LABELS, SPLITS, Sample, read_labels, split_by_group


def _synthetic(n_groups: int = 120) -> list[Sample]:
    rng = random.Random(7)
    samples = []
    for g in range(n_groups):
        label = BUSI_LABELS[g % 3]
        for i in range(rng.randint(1, 4)):
            other = BUSI_LABELS[(g + 1) % 3] if i == 3 else label  # some mixed groups
            samples.append(Sample(path=f"{label}/{g}_{i}.png", label=other, group=f"g{g:03d}"))
    return samples


def _assert_disjoint(split: dict[str, list[Sample]]) -> None:
    owner: dict[str, str] = {}
    for name, samples in split.items():
        for sample in samples:
            assert owner.setdefault(sample.group, name) == name, (
                f"group {sample.group} is in both {owner[sample.group]} and {name}"
            )


def test_groups_never_cross_splits_synthetic() -> None:
    samples = _synthetic()
    for seed in range(5):
        split = split_by_group(samples, seed=seed)
        assert set(split) == set(SPLITS)
        _assert_disjoint(split)
        assert sorted(s.path for v in split.values() for s in v) == sorted(s.path for s in samples)


def test_split_is_deterministic_and_order_independent() -> None:
    samples = _synthetic()
    shuffled = list(samples)
    random.Random(1).shuffle(shuffled)
    assert split_by_group(samples, seed=3) == split_by_group(shuffled, seed=3)
    assert split_by_group(samples, seed=3) != split_by_group(samples, seed=4)


def test_busi_split_disjoint_and_stratified(busi_dir: Path) -> None:
    samples = read_labels(busi_dir)
    split = split_by_group(samples, seed=0)
    _assert_disjoint(split)
    assert sum(len(v) for v in split.values()) == len(samples)
    groups = {name: len({s.group for s in v}) for name, v in split.items()}
    total = sum(groups.values())
    assert 0.65 < groups["train"] / total < 0.75
    for name in ("val", "test"):
        assert 0.12 < groups[name] / total < 0.18
        assert {s.label for s in split[name]} == set(BUSI_LABELS)
