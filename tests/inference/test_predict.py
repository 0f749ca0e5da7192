"""The bundled ultrasound model on its own BUSI test split: valid, deterministic, accurate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from inference import Classifier, Prediction, image_from_dataset, load_bundled
from inference.datasets import BUSI_LABELS, load_image, read_labels, split_by_group


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    return load_bundled("US")


@pytest.fixture(scope="module")
def busi_test_split(busi_dir: Path, classifier: Classifier) -> list[tuple[np.ndarray, str]]:
    seed = int(classifier.card.data["split"]["seed"])
    split = split_by_group(read_labels(busi_dir), seed=seed)
    return [(load_image(busi_dir / s.path), s.label) for s in split["test"]]


def _check(prediction: Prediction, image: np.ndarray, classifier: Classifier) -> None:
    assert prediction.modality == "US"
    assert prediction.labels == BUSI_LABELS
    assert prediction.label in BUSI_LABELS
    probabilities = prediction.probabilities
    assert prediction.label == max(probabilities, key=probabilities.__getitem__)
    assert sum(prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
    assert all(0.0 <= p <= 1.0 for p in prediction.probabilities.values())
    assert prediction.heatmap.shape == image.shape[:2]
    assert prediction.heatmap.dtype == np.float32
    assert float(prediction.heatmap.min()) >= 0.0 and float(prediction.heatmap.max()) <= 1.0
    assert float(prediction.heatmap.max()) > 0.0
    assert prediction.embedding.dtype == np.float32 and prediction.embedding.ndim == 1
    assert prediction.embedding.shape[0] == getattr(classifier.module, "embedding_size", -1)
    assert prediction.model_sha256 == classifier.card.sha256
    assert prediction.model_name == classifier.card.name
    assert prediction.model_version == classifier.card.version


def test_split_sizes_match_the_card(
    classifier: Classifier, busi_test_split: list[tuple[np.ndarray, str]]
) -> None:
    assert len(busi_test_split) == classifier.card.data["split"]["test"]["images"]


def test_predictions_are_valid_and_deterministic(
    classifier: Classifier, busi_test_split: list[tuple[np.ndarray, str]]
) -> None:
    for image, _ in busi_test_split[:: max(1, len(busi_test_split) // 4)]:
        first = classifier.predict(image)
        second = classifier.predict(image)
        _check(first, image, classifier)
        assert first.probabilities == second.probabilities
        assert np.array_equal(first.heatmap, second.heatmap)
        assert np.array_equal(first.embedding, second.embedding)


def test_grayscale_and_odd_sizes(
    classifier: Classifier, busi_test_split: list[tuple[np.ndarray, str]]
) -> None:
    rgb = busi_test_split[0][0]
    gray = rgb[..., 0]
    prediction = classifier.predict(gray)
    _check(prediction, gray, classifier)
    expected = classifier.predict(rgb).probabilities
    assert prediction.probabilities == pytest.approx(expected, abs=1e-4)
    wide = np.ascontiguousarray(np.repeat(gray, 3, axis=1)[:, :700])
    _check(classifier.predict(wide), wide, classifier)


def test_dicom_ultrasound_end_to_end(classifier: Classifier, dicom_samples: Path) -> None:
    ds = pydicom.dcmread(dicom_samples / "US/OBXXXX1A_rle_2frame.dcm")
    image = image_from_dataset(ds, 1)
    _check(classifier.predict(image), image, classifier)


def test_rejects_non_uint8(classifier: Classifier) -> None:
    with pytest.raises(ValueError, match="uint8"):
        classifier.predict(np.zeros((64, 64), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        classifier.predict(np.zeros((64, 64, 2), dtype=np.uint8))


def test_accuracy_on_own_test_split(
    classifier: Classifier, busi_test_split: list[tuple[np.ndarray, str]]
) -> None:
    from sklearn.metrics import roc_auc_score

    predictions = classifier.predict_batch([image for image, _ in busi_test_split])
    truth = [label for _, label in busi_test_split]
    accuracy = np.mean([p.label == t for p, t in zip(predictions, truth, strict=True)])
    # Chance is 0.58 for always "benign"; a broken model fails this.
    assert accuracy > 0.65, f"accuracy {accuracy:.3f} on the test split"
    scores = np.array([[p.probabilities[label] for label in BUSI_LABELS] for p in predictions])
    targets = np.array([BUSI_LABELS.index(t) for t in truth])
    auc = roc_auc_score(targets, scores, multi_class="ovr", average="macro")
    assert auc > 0.8, f"macro AUC {auc:.3f} on the test split"
    # The card's own figures are what this model reproduces.
    card_test = classifier.card.data["metrics"]["test"]
    assert accuracy == pytest.approx(card_test["accuracy"], abs=0.03)
    assert auc == pytest.approx(card_test["macro_auc_ovr"], abs=0.02)
    single = classifier.predict(busi_test_split[0][0])
    assert single.probabilities == pytest.approx(predictions[0].probabilities, abs=1e-5)


def test_hflip_test_time_augmentation(
    classifier: Classifier, busi_test_split: list[tuple[np.ndarray, str]]
) -> None:
    import dataclasses

    import torch

    data = dict(classifier.card.data)
    data["test_time_augmentation"] = "hflip"
    flip_card = dataclasses.replace(classifier.card, data=data)
    plain_card = dataclasses.replace(
        classifier.card, data={**data, "test_time_augmentation": "none"}
    )
    flipping = Classifier(flip_card, classifier.module)
    plain = Classifier(plain_card, classifier.module)
    image = busi_test_split[1][0]
    mirrored = np.ascontiguousarray(image[:, ::-1])
    with torch.no_grad():
        logits = (
            classifier.module(plain.preprocess(image)[None])
            + classifier.module(plain.preprocess(mirrored)[None])
        ) / 2
    expected = torch.softmax(logits / flip_card.temperature, dim=1)[0].numpy()
    prediction = flipping.predict(image)
    assert [prediction.probabilities[k] for k in flip_card.labels] == pytest.approx(
        expected.tolist(), abs=1e-5
    )
    # The mirrored image gives the same answer and a mirrored heatmap.
    other = flipping.predict(mirrored)
    assert other.probabilities == pytest.approx(prediction.probabilities, abs=1e-5)
    assert np.allclose(other.heatmap[:, ::-1], prediction.heatmap, atol=1e-3)
    _check(prediction, image, flipping)
