"""``breastcad evaluate``: its JSON checked against scikit-learn on a small real folder, and its
errors (unknown label folder, wrong modality) as a user sees them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    jaccard_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from inference import image_from_file, load_bundled
from inference.datasets import BUSI_LABELS, read_labels, split_by_group

REPO = Path(__file__).resolve().parents[2]


def _breastcad(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", *args],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )


@pytest.fixture(scope="module")
def busi_folder(busi_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight test-split images per label, copied into label folders."""
    folder = tmp_path_factory.mktemp("evaluate") / "busi"
    split = split_by_group(read_labels(busi_dir), seed=0)
    for label in BUSI_LABELS:
        (folder / label).mkdir(parents=True)
        picked = [s for s in split["test"] if s.label == label][:8]
        for sample in picked:
            shutil.copy(busi_dir / sample.path, folder / label / Path(sample.path).name)
    return folder


def test_json_matches_scikit_learn(busi_folder: Path) -> None:
    done = _breastcad("evaluate", "--modality", "US", "--data", str(busi_folder), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    classifier = load_bundled("US")
    files = sorted((p, p.parent.name) for p in busi_folder.rglob("*.png"))
    files.sort(key=lambda item: (BUSI_LABELS.index(item[1]), item[0].name))
    probabilities = np.array([
        [pred.probabilities[label] for label in BUSI_LABELS]
        for pred in classifier.predict_batch([image_from_file(p) for p, _ in files])
    ])
    truth = np.array([BUSI_LABELS.index(label) for _, label in files])
    predicted = probabilities.argmax(axis=1)
    assert result["n"] == len(files) == 24
    assert result["labels"] == list(BUSI_LABELS)
    assert result["accuracy"] == pytest.approx(accuracy_score(truth, predicted))
    assert result["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(truth, predicted))
    assert result["precision"] == pytest.approx(
        precision_score(truth, predicted, average="macro", zero_division=0))
    assert result["recall"] == pytest.approx(recall_score(truth, predicted, average="macro"))
    assert result["f1"] == pytest.approx(f1_score(truth, predicted, average="macro"))
    assert result["jaccard"] == pytest.approx(jaccard_score(truth, predicted, average="macro"))
    assert result["auc"] == pytest.approx(
        roc_auc_score(truth, probabilities, multi_class="ovr", average="macro"), abs=1e-6)
    assert result["auc_abnormal"] == pytest.approx(
        roc_auc_score(truth != 0, 1 - probabilities[:, 0]), abs=1e-6)
    assert result["confusion_matrix"] == confusion_matrix(truth, predicted).tolist()
    assert set(result["per_class"]) == set(BUSI_LABELS)
    assert result["per_class"]["malignant"]["support"] == 8
    assert result["model"]["name"] == classifier.card.name
    reference = result["ece_calibrated_reference"]
    assert 0.0 < reference["mean"] <= reference["p95"] < 1.0


def test_ece_reference_of_a_calibrated_model_shrinks_with_n_and_exposes_overconfidence() -> None:
    """ECE on a small set is biased upwards: the reference is what a perfectly calibrated model
    scores on as many images with the same confidences, so a measured ECE means something only
    above its ``p95``."""
    from inference.metrics import calibrated_ece_reference, expected_calibration_error

    rng = np.random.default_rng(7)

    def calibrated(n: int) -> tuple[np.ndarray, np.ndarray]:
        """n three-class probability rows, and labels drawn from them (calibrated by design)."""
        logits = rng.normal(0, 1.5, (n, 3))
        p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        labels = np.array([rng.choice(3, p=row) for row in p])
        return p, labels

    small, large = calibrated(100)[0], calibrated(5000)[0]
    assert calibrated_ece_reference(small)["mean"] > 0.05  # a 0.05 target is below the noise
    assert calibrated_ece_reference(large)["mean"] < 0.02
    # calibrated sets fall below the reference's 95th percentile about 95 % of the time
    below = 0
    for _ in range(40):
        p, labels = calibrated(100)
        below += expected_calibration_error(p, labels) <= calibrated_ece_reference(p)["p95"]
    assert below >= 34
    # an overconfident model (says 0.95, right 60 % of the time) is far above it
    p = np.tile([0.95, 0.03, 0.02], (100, 1))
    labels = np.where(rng.random(100) < 0.6, 0, 1)
    assert expected_calibration_error(p, labels) > calibrated_ece_reference(p)["p95"] + 0.2


def test_binary_metrics_of_the_positive_class() -> None:
    from inference.metrics import evaluation_metrics

    probabilities = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.8, 0.2], [0.45, 0.55]])
    truth = np.array([0, 0, 1, 1, 1])
    predicted = probabilities.argmax(axis=1)
    result = evaluation_metrics(probabilities, truth, ("non_idc", "idc"))
    assert result["precision"] == pytest.approx(precision_score(truth, predicted))
    assert result["recall"] == pytest.approx(recall_score(truth, predicted))
    assert result["f1"] == pytest.approx(f1_score(truth, predicted))
    assert result["specificity"] == pytest.approx(0.5)
    assert result["jaccard"] == pytest.approx(jaccard_score(truth, predicted))
    assert result["auc"] == pytest.approx(roc_auc_score(truth, probabilities[:, 1]))
    assert "auc_abnormal" not in result


def test_unknown_label_folder_is_a_clear_error(busi_folder: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(busi_folder, bad)
    (bad / "cancer").mkdir()
    done = _breastcad("evaluate", "--modality", "US", "--data", str(bad), "--json")
    assert done.returncode == 2
    assert "unknown label folder(s) 'cancer'" in done.stderr
    assert "normal, benign, malignant" in done.stderr
    assert done.stdout == ""


def test_model_of_another_modality_is_refused(busi_folder: Path) -> None:
    card = load_bundled("US").card
    assert card.path is not None
    done = _breastcad("evaluate", "--modality", "SM", "--data", str(busi_folder),
                      "--model", str(card.path))
    assert done.returncode == 2
    assert "is for US, not SM" in done.stderr
