"""bench/mg_cv.py: folds by woman on the development patients only, and the pooling table from
fold files (a synthetic set where the answer is known: abnormal breasts score above their
partner, while each woman's overall level varies)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import mg_cv  # noqa: E402

from inference.datasets import MIAS_LABELS, read_mias, split_by_group  # noqa: E402


def test_folds_keep_each_woman_whole_and_leave_the_test_split_out(shared_data: Path) -> None:
    data = shared_data / "mini-mias"
    if not (data / "labels.csv").is_file():
        pytest.skip("mini-MIAS not in shared data")
    development = mg_cv.development_samples(data)
    test_women = {s.group for s in split_by_group(read_mias(data), seed=0,
                                                  labels=MIAS_LABELS)["test"]}
    assert not test_women & {s.group for s in development}
    folds = mg_cv.folds_of(development, 4, 0)
    women = [{s.group for s in fold} for fold in folds]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not women[i] & women[j], "a woman in two folds"
    assert sum(len(f) for f in folds) == len(development)
    assert max(len(w) for w in women) - min(len(w) for w in women) <= 1


def test_pool_scores_the_bilateral_rule_against_the_single_image_rule(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = []
    for woman in range(40):
        level = rng.uniform(0.1, 0.7)  # dense or fatty: both breasts alike
        abnormal_side = "R" if woman % 2 else None
        for side in ("R", "L"):
            lesion = np.full(30, level) + rng.normal(0, 0.01, 30)
            if side == abnormal_side:
                lesion[:3] += 0.2
            p = np.stack([1 - lesion, lesion / 2, lesion / 2], axis=1)
            images.append({"path": f"x/{woman}{side}.png", "patient": f"w{woman}", "side": side,
                           "target": int(side == abnormal_side), "p": p,
                           "centres": np.stack([np.arange(30), np.arange(30)], axis=1),
                           "shape": (64, 64)})
    mg_cv.write_fold(tmp_path / "fold0.npz", images[:40], best_epoch=1)
    mg_cv.write_fold(tmp_path / "fold1.npz", images[40:], best_epoch=1)
    data = tmp_path / "labels"
    data.mkdir()
    (data / "labels.csv").write_text(
        "path,abnormality\n" + "".join(f"{im['path']},{'CIRC' if im['target'] else 'NORM'}\n"
                                       for im in images))
    result = mg_cv.pool(data, tmp_path, rounds=100)
    rows = {(r["pooling"], r["k"], r["lambda"], r["pectoral_cut"]): r for r in result["rows"]}
    assert result["images"] == 80
    assert rows[("bilateral", 3, 1.0, 0.0)]["auc"] == pytest.approx(1.0)
    assert rows[("top-k", 3, 0.0, 0.0)]["auc"] < 0.9, "the women's levels hide the lesions"
    low, high = rows[("top-k", 3, 0.0, 0.0)]["low"], rows[("top-k", 3, 0.0, 0.0)]["high"]
    assert low <= rows[("top-k", 3, 0.0, 0.0)]["auc"] <= high
    assert result["primary_difference"][0] > 0.1
    assert (tmp_path / "pooling.json").is_file()
