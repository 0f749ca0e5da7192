"""``breastcad ensemble``: separately trained runs become one model whose logits are the members'
mean, calibrated and evaluated on the members' split; runs that cannot be ensembled are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dicom_node.cli import app
from inference import Classifier, ModelCard
from inference.card import sha256_file
from inference.ensemble import assemble
from inference.metrics import evaluation_metrics, softmax
from inference.networks import SeedEnsemble, build_network
from inference.train import train
from tests.inference.test_train import _tiny_busi


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """Two tiny US runs, training seeds 1 and 2 on the split of seed 0."""
    root = tmp_path_factory.mktemp("ensemble")
    data = _tiny_busi(root / "busi")
    cards = [
        train("US", data, root / f"seed{seed}", epochs=2, seed=seed, split_seed=0, size=32,
              batch_size=8, patience=5, threads=1)
        for seed in (1, 2)
    ]
    return data, cards


def test_members_share_the_split_and_differ_in_seed(runs: tuple[Path, list[Path]]) -> None:
    _, cards = runs
    raw = [json.loads(path.read_text()) for path in cards]
    assert [r["split"]["seed"] for r in raw] == [0, 0]
    assert [r["training"]["seed"] for r in raw] == [1, 2]
    assert raw[0]["split"]["test"] == raw[1]["split"]["test"]
    assert raw[0]["sha256"] != raw[1]["sha256"]


def test_ensemble_averages_the_members_logits(
    runs: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    data, cards = runs
    card_path = assemble(cards, tmp_path / "ens", data_dir=data, version="9.0.0", threads=1)
    card = ModelCard.from_file(card_path)
    raw = json.loads(card_path.read_text())
    assert card.architecture == "SeedEnsemble" and card.version == "9.0.0"
    assert card.sha256 == sha256_file(tmp_path / "ens" / "us_busi.pt")
    assert raw["ood"]["sha256"] == sha256_file(tmp_path / "ens" / "us_busi_ood.npz")
    assert [m["seed"] for m in raw["training"]["members"]] == [1, 2]
    assert raw["split"]["seed"] == 0
    for name in ("us_busi_confusion.png", "us_busi_roc.png"):
        assert (tmp_path / "ens" / name).is_file()

    ensemble = Classifier.from_card(card)
    members = [Classifier.from_card(ModelCard.from_file(path)) for path in cards]
    x = torch.stack([members[0].preprocess(np.full((40, 44), v, np.uint8) +
                                           np.eye(40, 44, dtype=np.uint8) * 90)
                     for v in (10, 60, 120)])
    with torch.no_grad():
        expected = torch.stack([m.module(x) for m in members]).mean(dim=0)
        got = ensemble.module(x)
    torch.testing.assert_close(got, expected)
    assert ensemble.network.embed(ensemble.network.forward_features(x)).shape == (3, 512)

    # the card's test metrics are what its own model gives on the test split
    prediction = ensemble.predict(np.full((40, 44), 30, np.uint8))
    assert prediction.heatmap.shape == (40, 44)
    assert sorted(prediction.probabilities) == sorted(card.labels)
    test = raw["metrics"]["test"]
    assert test["n"] == raw["split"]["test"]["images"]
    assert 0.0 <= test["accuracy"] <= 1.0


def test_ensemble_metrics_match_a_recomputation(
    runs: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    """The card's validation figures equal softmax(mean logits / T) recomputed here."""
    data, cards = runs
    card_path = assemble(cards, tmp_path / "ens", data_dir=data, threads=1)
    raw = json.loads(card_path.read_text())
    from inference.datasets import ImageDataset, split_by_group
    from inference.train import _loader, recipe_for
    from inference.transforms import preprocess_transform

    recipe = recipe_for("US")
    split = split_by_group(recipe.reader(data), seed=0, labels=recipe.labels)
    ensemble = Classifier.from_card(ModelCard.from_file(card_path))
    dataset = ImageDataset(data, split["val"], preprocess_transform(32, 1), recipe.labels,
                           normalize=ensemble._normalize, loader=_loader(recipe))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        logits = ensemble.module(images).numpy()
        if raw["test_time_augmentation"] == "hflip":
            logits = (logits + ensemble.module(torch.flip(images, dims=[3])).numpy()) / 2
    metrics = evaluation_metrics(softmax(logits, raw["temperature"]), np.array(dataset.targets),
                                 recipe.labels)
    assert metrics["accuracy"] == pytest.approx(raw["metrics"]["val"]["accuracy"])
    assert metrics["nll"] == pytest.approx(raw["metrics"]["val"]["nll"], abs=1e-6)


def test_runs_that_cannot_be_ensembled_are_refused(
    runs: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    data, cards = runs
    with pytest.raises(ValueError, match="two or more"):
        assemble(cards[:1], tmp_path / "one", data_dir=data)
    with pytest.raises(ValueError, match="listed twice"):
        assemble([cards[0], cards[0]], tmp_path / "twice", data_dir=data)
    other_split = train("US", data, tmp_path / "split3", epochs=1, seed=3, size=32,
                        batch_size=8, threads=1)
    with pytest.raises(ValueError, match="different splits"):
        assemble([cards[0], other_split], tmp_path / "mixed", data_dir=data)
    other_size = train("US", data, tmp_path / "size40", epochs=1, seed=4, split_seed=0, size=40,
                       batch_size=8, threads=1)
    with pytest.raises(ValueError, match="differ in"):
        assemble([cards[0], other_size], tmp_path / "sizes", data_dir=data)
    assert not (tmp_path / "mixed").exists() and not (tmp_path / "sizes").exists()

    runner = CliRunner()
    result = runner.invoke(app, ["ensemble", str(cards[0]), "--out", str(tmp_path / "cli"),
                                 "--data", str(data)])
    assert result.exit_code == 2 and "two or more" in result.output
    ok = runner.invoke(app, ["ensemble", *map(str, cards), "--out", str(tmp_path / "cli"),
                             "--data", str(data), "--threads", "1"])
    assert ok.exit_code == 0, ok.output
    assert "test accuracy" in ok.output


def test_seed_ensemble_refuses_bad_members() -> None:
    with pytest.raises(ValueError, match="two or more"):
        SeedEnsemble(members=1)
    with pytest.raises(ValueError, match="cannot ensemble"):
        SeedEnsemble(member_architecture="SeedEnsemble")
    net = build_network("SeedEnsemble", {"in_channels": 3, "num_classes": 2, "input_size": 50,
                                         "member_architecture": "MonaiResNet", "members": 3})
    assert net(torch.zeros(2, 3, 50, 50)).shape == (2, 2)
