"""``breastcad ensemble`` for mammography patch models: two tiny MG runs on one split become one
patch model whose patch logits are the members' mean, with top_k, flips, Platt scaling and the
bilateral logistic fitted again on validation; it serves a mammogram like a single run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inference import ModelCard
from inference.card import sha256_file
from inference.datasets import MIAS_LABELS
from inference.ensemble import assemble
from inference.mammo_patches import MammoPatchClassifier, classifier_from_card
from inference.metrics import evaluation_metrics
from inference.train import train
from tests.inference.test_mammo_patches import _tiny_mias


@pytest.fixture(scope="module")
def mg_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """Two tiny MG runs, training seeds 1 and 2 on the split of seed 0."""
    root = tmp_path_factory.mktemp("mg_ensemble")
    data = _tiny_mias(root / "mias")
    cards = [
        train("MG", data, root / f"seed{seed}", epochs=2, seed=seed, split_seed=0,
              max_minutes=600.0, patience=5, threads=1)
        for seed in (1, 2)
    ]
    return data, cards


def test_mg_members_share_the_split(mg_runs: tuple[Path, list[Path]]) -> None:
    _, cards = mg_runs
    raw = [json.loads(path.read_text()) for path in cards]
    assert [r["split"]["seed"] for r in raw] == [0, 0]
    assert [r["training"]["seed"] for r in raw] == [1, 2]
    assert raw[0]["split"]["test"] == raw[1]["split"]["test"]


def test_mg_ensemble_averages_patch_logits_and_serves(
    mg_runs: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    data, cards = mg_runs
    card_path = assemble(cards, tmp_path / "ens", data_dir=data, version="9.1.0", threads=1)
    card = ModelCard.from_file(card_path)
    raw = json.loads(card_path.read_text())
    assert card.architecture == "SeedEnsemble" and card.version == "9.1.0"
    assert raw["postprocessing_kind"] == "mammo_patch_topk"
    assert raw["architecture_params"]["member_architecture"] == "BusiCNN"
    assert card.sha256 == sha256_file(tmp_path / "ens" / "mg_mias.pt")
    assert raw["ood"]["sha256"] == sha256_file(tmp_path / "ens" / "mg_mias_ood.npz")
    assert [m["seed"] for m in raw["training"]["members"]] == [1, 2]
    patch = raw["patch_model"]
    assert patch["bilateral_lambda"] == 1.0 and patch["top_k"] >= 1
    assert set(raw["pooling_validation_auc"]) >= {"views=1 top_k=3", "views=4 top_k=3"}
    assert raw["metrics"]["test"]["n"] == raw["split"]["test"]["images"]
    assert raw["throughput"]["images_per_second"] > 0
    for name in ("mg_mias_confusion.png", "mg_mias_roc.png"):
        assert (tmp_path / "ens" / name).is_file()

    ensemble = classifier_from_card(card)
    assert isinstance(ensemble, MammoPatchClassifier)
    members = [classifier_from_card(ModelCard.from_file(path)) for path in cards]
    image = np.asarray(Image.open(data / "benign" / "mdb001.png"))
    patches = ensemble.preprocess(image)
    assert patches.shape[1:] == (1, 64, 64)
    with torch.no_grad():
        expected = torch.stack([m.module(patches) for m in members]).mean(dim=0)
        got = ensemble.module(patches)
    torch.testing.assert_close(got, expected)

    prediction = ensemble.predict(image)
    assert sorted(prediction.probabilities) == sorted(MIAS_LABELS)
    assert prediction.heatmap.shape == image.shape[:2]
    assert prediction.raw_score is not None

    # the card's validation figures are what the served ensemble gives on the validation split
    # (per image through predict, then the card's bilateral rule over each woman's two images)
    from inference.datasets import split_by_group
    from inference.train import recipe_for
    from inference.train_mammo import bilateral_rows

    recipe = recipe_for("MG")
    val = split_by_group(recipe.reader(data), seed=0, labels=MIAS_LABELS)["val"]
    predictions = [ensemble.predict(np.asarray(Image.open(data / s.path))) for s in val]
    rows = bilateral_rows(
        np.array([[p.probabilities[name] for name in MIAS_LABELS] for p in predictions]),
        [float(p.raw_score or 0.0) for p in predictions], [s.group for s in val],
        ensemble.settings)
    targets = np.array([MIAS_LABELS.index(s.label) for s in val])
    metrics = evaluation_metrics(rows, targets, MIAS_LABELS)
    assert metrics["n"] == raw["metrics"]["val"]["n"]
    assert metrics["auc_abnormal"] == pytest.approx(raw["metrics"]["val"]["auc_abnormal"],
                                                    abs=1e-6)
    assert metrics["nll"] == pytest.approx(raw["metrics"]["val"]["nll"], abs=1e-4)


def test_mg_runs_that_cannot_be_ensembled_are_refused(
    mg_runs: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    data, cards = mg_runs
    other = json.loads(cards[1].read_text())
    other["patch_model"]["working_height"] = 128
    changed = tmp_path / "changed" / "mg_mias.json"
    changed.parent.mkdir()
    for name in ("mg_mias.pt", "mg_mias_ood.npz"):
        changed.with_name(name).write_bytes(cards[1].with_name(name).read_bytes())
    changed.write_text(json.dumps(other))
    with pytest.raises(ValueError, match="patch_model.working_height"):
        assemble([cards[0], changed], tmp_path / "mixed", data_dir=data, threads=1)
    assert not (tmp_path / "mixed").exists()
