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
