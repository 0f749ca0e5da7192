"""inference_backend: TorchScript and ONNX Runtime give eager's probabilities (within 1e-4) and
heatmaps on real images, for every bundled model; an unknown backend is refused."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inference import Classifier, ModelCard, bundled_cards
from inference.backends import compile_features
from inference.mammo_patches import MammoPatchClassifier, classifier_from_card, is_patch_card

# Whole-image models; the MG patch model stays eager (test below).
_CARDS = [card for card in bundled_cards()
          if card.modality in {"US", "SM", "MG"} and not is_patch_card(card)]
_PATCH_CARDS = [card for card in bundled_cards() if is_patch_card(card)]


def _images(card: ModelCard, shared_data: Path, count: int = 6) -> list[np.ndarray]:
    folder = {"US": "busi", "SM": "idc-breast-histopathology", "MG": "mini-mias"}[card.modality]
    labels = shared_data / folder / "labels.csv"
    if not labels.is_file():
        pytest.skip(f"{labels} not available")
    with labels.open() as handle:
        rows = list(csv.DictReader(handle))
    picked = rows[:: max(1, len(rows) // count)][:count]
    images = []
    for row in picked:
        with Image.open(labels.parent / row["path"]) as im:
            images.append(np.asarray(im.convert("RGB" if card.modality == "SM" else "L")))
    return images


@pytest.mark.parametrize("backend", ["torchscript", "onnx"])
@pytest.mark.parametrize("card", _CARDS, ids=lambda card: card.name)
def test_backend_matches_eager_on_real_images(
    card: ModelCard, backend: str, shared_data: Path
) -> None:
    images = _images(card, shared_data)
    eager = Classifier.from_card(card)
    fast = Classifier.from_card(card).with_backend(backend)
    assert fast.backend == backend and eager.backend == "eager"
    expected = eager.predict_batch(images)
    got = fast.predict_batch(images)
    for want, have in zip(expected, got, strict=True):
        assert have.label == want.label
        for name in card.labels:
            assert abs(have.probabilities[name] - want.probabilities[name]) <= 1e-4
        np.testing.assert_allclose(have.embedding, want.embedding, atol=1e-3)
        # Grad-CAM stays eager on the trunk's features: the same map up to rounding
        np.testing.assert_allclose(have.heatmap, want.heatmap, atol=1e-3)
    # a different batch size than the one traced/exported with
    single = fast.predict(images[0])
    assert abs(single.probability - expected[0].probability) <= 1e-4


@pytest.mark.skipif(not _PATCH_CARDS, reason="no bundled patch model (MG)")
def test_the_patch_model_stays_eager_and_refuses_unknown_backends() -> None:
    classifier = classifier_from_card(_PATCH_CARDS[0])
    assert isinstance(classifier, MammoPatchClassifier)
    for backend in ("torchscript", "onnx", "eager"):
        assert classifier.with_backend(backend).backend == "eager"
    with pytest.raises(ValueError, match="unknown inference backend 'tensorrt'"):
        classifier.with_backend("tensorrt")


def test_unknown_backend_is_refused() -> None:
    card = _CARDS[0]
    classifier = Classifier.from_card(card)
    with pytest.raises(ValueError, match="unknown inference backend 'tensorrt'"):
        classifier.with_backend("tensorrt")
    with pytest.raises(ValueError, match="unknown inference backend"):
        compile_features(classifier.module, "", np.zeros(1))  # type: ignore[arg-type]
