"""The MG operating point and cross-validated calibration (``inference.mammo_cv``): the label
rule, the threshold search against a brute-force one, metrics of served labels, and the
out-of-fold map files. The end-to-end ``recalibrate`` of a trained model is in
test_mammo_patches.py, beside the tiny model it needs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

from inference.mammo_cv import (
    cross_validated_calibration,
    load_ensemble,
    write_fold,
    youden_threshold,
)
from inference.mammo_patches import PatchSettings, label_index, label_indices
from inference.metrics import evaluation_metrics


def test_label_rule_is_the_argmax_without_an_operating_point_and_the_threshold_with_one() -> None:
    row = np.array([0.6, 0.25, 0.15])
    assert label_index(row, PatchSettings()) == 0
    with_point = PatchSettings(abnormal_threshold=0.3)
    assert label_index(row, with_point) == 1  # p(abnormal) 0.4 >= 0.3: benign, the larger
    assert label_index(np.array([0.6, 0.1, 0.3]), with_point) == 2
    assert label_index(np.array([0.75, 0.2, 0.05]), with_point) == 0
    # the threshold itself is abnormal; argmax would call (0.45, 0.3, 0.25) normal
    assert label_index(np.array([0.7, 0.2, 0.1]), with_point) == 1
    assert label_index(np.array([0.45, 0.3, 0.25]), PatchSettings()) == 0
    assert label_index(np.array([0.45, 0.3, 0.25]), PatchSettings(abnormal_threshold=0.5)) == 1
    rows = np.array([[0.9, 0.05, 0.05], [0.6, 0.1, 0.3]])
    assert label_indices(rows, with_point).tolist() == [0, 2]


def test_youden_threshold_is_the_best_cut_of_a_brute_force_search() -> None:
    rng = np.random.default_rng(3)
    truth = rng.random(80) < 0.35
    p = np.clip(0.3 + 0.25 * truth + rng.normal(0, 0.2, 80), 0.001, 0.999)
    threshold, sensitivity, specificity = youden_threshold(p, truth)
    best = max((p >= cut)[truth].mean() + (p < cut)[~truth].mean() for cut in np.unique(p))
    called = p >= threshold
    assert called[truth].mean() + (~called[~truth]).mean() == pytest.approx(best)
    assert (sensitivity, specificity) == pytest.approx((called[truth].mean(),
                                                        (~called[~truth]).mean()))
    assert threshold not in set(p.tolist())  # halfway between two scores, not on one
    with pytest.raises(ValueError, match="both"):
        youden_threshold(p, np.zeros(80, dtype=bool))


def test_metrics_score_the_served_labels_and_the_aucs_score_the_probabilities() -> None:
    rng = np.random.default_rng(0)
    targets = np.array([0] * 20 + [1] * 10 + [2] * 10)
    abnormal = np.clip(0.2 + 0.3 * (targets > 0) + rng.normal(0, 0.1, 40), 0.01, 0.6)
    probabilities = np.stack([1 - abnormal, abnormal * 0.6, abnormal * 0.4], axis=1)
    settings = PatchSettings(abnormal_threshold=0.35)
    served = label_indices(probabilities, settings)
    assert (served != probabilities.argmax(axis=1)).any()  # the rules differ on these
    result = evaluation_metrics(probabilities, targets, ("normal", "benign", "malignant"), served)
    assert result["accuracy"] == pytest.approx(accuracy_score(targets, served))
    assert result["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(targets, served))
    assert result["auc_abnormal"] == pytest.approx(roc_auc_score(targets > 0, abnormal))
    assert np.trace(np.array(result["confusion_matrix"])) == int((served == targets).sum())
    plain = evaluation_metrics(probabilities, targets, ("normal", "benign", "malignant"))
    assert plain["auc_abnormal"] == result["auc_abnormal"]
    assert plain["accuracy"] == pytest.approx(accuracy_score(targets,
                                                             probabilities.argmax(axis=1)))
    with pytest.raises(ValueError, match="shape"):
        evaluation_metrics(probabilities, targets, ("normal", "benign", "malignant"), served[:3])


def _fold_images(rng: np.random.Generator, women: int) -> list[dict[str, object]]:
    images: list[dict[str, object]] = []
    for woman in range(women):
        lesion_side = "L" if woman % 3 == 0 else ("R" if woman % 3 == 1 else "")
        for side in ("L", "R"):
            p = rng.dirichlet([8, 1, 1], size=30).astype(np.float32)
            target = int(side == lesion_side)
            if target:
                p[int(rng.integers(30))] = [0.3, 0.4, 0.3]
            images.append({"path": f"x/{woman}{side}.png", "patient": f"w{woman}", "side": side,
                           "target": target, "p": p, "centres": np.arange(60).reshape(30, 2),
                           "shape": (500, 300)})
    return images


def test_out_of_fold_maps_round_trip_average_and_calibrate(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    images = _fold_images(rng, 30)
    again = [{**im, "p": np.asarray(im["p"]) * 0.5 + 0.5 / 3} for im in images]
    write_fold(first / "fold0.npz", images[:30], best_epoch=3)
    write_fold(first / "fold1.npz", images[30:])
    write_fold(second / "fold0.npz", again)
    averaged = load_ensemble([first, second])
    assert [im["path"] for im in averaged] == sorted(str(im["path"]) for im in images)
    by_path = {im["path"]: im for im in images}
    for image in averaged:
        expected = (np.asarray(by_path[image["path"]]["p"]) * 1.5 + 0.5 / 3) / 2
        assert np.allclose(image["p"], expected, atol=1e-6)
    settings = PatchSettings(top_k=1, bilateral_lambda=1.0)
    calibration = cross_validated_calibration(averaged, settings, ["a", "b"])
    assert calibration.images == 60 and calibration.abnormal == 20
    assert calibration.bilateral_a > 0  # a breast above its partner is the abnormal one
    assert 0.0 < calibration.abnormal_threshold < 1.0
    assert calibration.auc > 0.9 and calibration.sensitivity > 0.8
    fitted = calibration.applied_to(settings)
    assert fitted.abnormal_threshold == calibration.abnormal_threshold
    assert fitted.top_k == 1 and fitted.bilateral_lambda == 1.0
    other = tmp_path / "c"
    other.mkdir()
    write_fold(other / "fold0.npz", images[:10])
    with pytest.raises(ValueError, match="same images"):
        load_ensemble([first, other])
    with pytest.raises(ValueError, match="no fold"):
        load_ensemble([first, tmp_path / "missing"])
