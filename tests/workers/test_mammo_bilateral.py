"""The bilateral rule of the mammography patch model, through the study pipeline.

A study with both breasts: with a card whose ``patch_model.bilateral_lambda`` is 1, each
breast's probabilities come from its score minus the other breast's (``workers.mammo``
calls ``MammoPatchClassifier.bilateral_finding``); without it, or with one breast only, the
breast's finding is the mean of its views as before. The classifier is the bundled MG model
(its verdicts are not what is tested: test AUC 0.66); what is checked is the arithmetic and who
gets compared with whom, on real mini-MIAS mammograms as DICOM.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from support.dicom_factory import mias_as_mammogram

from inference import ModelCard
from inference.mammo_patches import MammoPatchClassifier, classifier_from_card
from inference.paths import BUNDLED_DIR
from workers.mammo import analyse_series

CANDIDATE = BUNDLED_DIR / "mg_mias.json"
BILATERAL = {"bilateral_lambda": 1.0, "bilateral_a": 6.0, "bilateral_b": -1.5}


def _classifier(**patch_model: float) -> MammoPatchClassifier:
    data = dict(ModelCard.from_file(CANDIDATE).data)
    data["patch_model"] = {**data["patch_model"], **patch_model}
    card = ModelCard.from_dict(data, path=CANDIDATE)
    classifier = classifier_from_card(card, CANDIDATE.parent / data["weights"])
    assert isinstance(classifier, MammoPatchClassifier)
    return classifier


def _study(shared_data: Path, tmp_path: Path, refs: list[tuple[str, str]]) -> list[Dataset]:
    study, patient = generate_uid(), "BILAT-1"
    out = []
    for number, (ref, side) in enumerate(refs, start=1):
        [png] = sorted((shared_data / "mini-mias").glob(f"*/{ref}.png")) or [None]
        if png is None:
            pytest.skip(f"mini-MIAS {ref} not in shared data")
        small = tmp_path / f"{ref}.png"
        with Image.open(png) as image:
            image.convert("L").resize((512, 512), Image.Resampling.BOX).save(small)
        out.append(mias_as_mammogram(small, side="R" if side == "R" else "L", view="MLO",
                                     patient_id=patient, study_instance_uid=study,
                                     series_instance_uid=generate_uid(), instance_number=number))
    return out


def _abnormal(probabilities: dict[str, float]) -> float:
    return probabilities["benign"] + probabilities["malignant"]


def test_each_breast_is_compared_with_the_other(shared_data: Path, tmp_path: Path) -> None:
    # a right breast with a benign mass (mdb001) and a normal left breast (mdb004) put into
    # one study: the rule's arithmetic, not a real woman's pair
    datasets = _study(shared_data, tmp_path, [("mdb001", "R"), ("mdb004", "L")])
    bilateral = analyse_series(datasets, _classifier(**BILATERAL))
    plain = analyse_series(datasets, _classifier(bilateral_lambda=0.0))
    scores = {}
    for analysis in bilateral.analyses:
        assert analysis.prediction.raw_score is not None
        scores[str(analysis.source.ImageLaterality)] = analysis.prediction.raw_score
    assert scores["R"] != scores["L"]
    groups = {g.laterality: g for g in bilateral.groups}
    plain_groups = {g.laterality: g for g in plain.groups}
    for side, other in (("R", "L"), ("L", "R")):
        finding = groups[side].prediction
        expected = 1.0 / (1.0 + math.exp(-(6.0 * (scores[side] - scores[other]) - 1.5)))
        assert _abnormal(finding.probabilities) == pytest.approx(expected, abs=1e-6)
        assert sum(finding.probabilities.values()) == pytest.approx(1.0, abs=1e-9)
        assert "bilateral" in finding.extra
        # the per-image predictions are the single-image rule's, unchanged
        assert plain_groups[side].prediction.probabilities == pytest.approx(
            bilateral.analyses[0 if side == "R" else 1].prediction.probabilities)
        # benign/malignant split kept from the breast's own views
        own = plain_groups[side].prediction.probabilities
        assert finding.probabilities["malignant"] / _abnormal(finding.probabilities) == \
            pytest.approx(own["malignant"] / _abnormal(own), abs=1e-6)
    higher = max(scores, key=lambda side: scores[side])
    lower = "L" if higher == "R" else "R"
    assert _abnormal(groups[higher].prediction.probabilities) > _abnormal(
        groups[lower].prediction.probabilities)
    # the study finding is the more suspicious breast's
    study = [g for g in bilateral.groups if g.laterality == "B"]
    assert len(study) == 1


def test_the_same_image_on_both_sides_gives_the_calibrated_baseline(
    shared_data: Path, tmp_path: Path
) -> None:
    datasets = _study(shared_data, tmp_path, [("mdb003", "R"), ("mdb003", "L")])
    result = analyse_series(datasets, _classifier(**BILATERAL))
    baseline = 1.0 / (1.0 + math.exp(1.5))  # difference 0 -> sigmoid(b)
    for group in result.groups:
        if group.laterality in ("R", "L"):
            assert _abnormal(group.prediction.probabilities) == pytest.approx(baseline,
                                                                               abs=1e-6)


def test_one_breast_or_no_rule_keeps_the_mean_of_the_views(
    shared_data: Path, tmp_path: Path
) -> None:
    one_side = _study(shared_data, tmp_path, [("mdb001", "R")])
    result = analyse_series(one_side, _classifier(**BILATERAL))
    [group] = result.groups
    assert group.prediction.probabilities == result.analyses[0].prediction.probabilities
    assert "bilateral" not in group.prediction.extra
    both = _study(shared_data, tmp_path, [("mdb001", "R"), ("mdb004", "L")])
    plain = analyse_series(both, _classifier(bilateral_lambda=0.0))
    for group in plain.groups:
        if group.laterality in ("R", "L"):
            [index] = group.source_indices
            assert group.prediction.probabilities == plain.analyses[index].prediction.probabilities
            assert "bilateral" not in group.prediction.extra
    assert np.isfinite(plain.series_prediction.probabilities["normal"])
