"""The out-of-distribution check: images unlike the training data are "not assessable"."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inference import image_from_file, load_bundled
from inference.datasets import load_image, read_labels, split_by_group


def test_us_model_flags_non_breast_images(busi_dir: Path, dicom_samples: Path) -> None:
    classifier = load_bundled("US")
    assert classifier.ood_scorer is not None, "the bundled US model has no OOD statistics"
    split = split_by_group(read_labels(busi_dir), seed=0)
    breast = classifier.predict_batch([load_image(busi_dir / s.path) for s in split["test"]])
    flagged = np.mean([p.not_assessable for p in breast])
    assert flagged <= 0.10, f"{flagged:.0%} of held-out breast ultrasound flagged"
    # Not breast: an abdominal (kidney) ultrasound with a scanner's screen around it, a blank
    # frame, noise, and a test pattern.
    others = {
        "kidney US": image_from_file(dicom_samples / "US" / "US1_UNCR.dcm"),
        "blank": np.zeros((400, 500), dtype=np.uint8),
        "noise": np.random.default_rng(0).integers(0, 256, (400, 500)).astype(np.uint8),
        "test pattern": image_from_file(
            dicom_samples / "MG" / "MG_Explicit_Little_dclunie_testpattern.dcm"),
    }
    breast_scores = [p.ood_score for p in breast if p.ood_score is not None]
    for name, image in others.items():
        prediction = classifier.predict(image)
        assert prediction.not_assessable, name
        assert prediction.ood_score is not None
        assert prediction.ood_score > np.median(breast_scores), name


def test_tampered_ood_statistics_are_refused(tmp_path: Path) -> None:
    import shutil

    from inference import Classifier, ModelCard

    card = load_bundled("US").card
    assert card.path is not None
    copy = tmp_path / "model"
    shutil.copytree(card.path.parent, copy)
    ood = copy / str(card.ood["file"])
    ood.write_bytes(ood.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ValueError, match="OOD statistics"):
        Classifier.from_card(ModelCard.from_file(copy / card.path.name))
