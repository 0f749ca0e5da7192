"""The mammography patch model: geometry of the working view, the lesion coordinates, and a
model trained for two epochs on a tiny synthetic mini-MIAS (seconds) served end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inference import ModelCard, load_bundled
from inference.card import sha256_file
from inference.datasets import MIAS_LABELS, read_mias_lesions
from inference.mammo_patches import (
    MammoPatchClassifier,
    PatchSettings,
    bilateral_differences,
    classifier_from_card,
    grid_centres,
    image_probabilities,
    working_view,
)
from inference.networks import ARCHITECTURES, build_network
from inference.train import train
from inference.train_mammo import lesion_positions, patch_network_params

SIZE = 256


def _breast(rng: np.random.Generator, on_right: bool) -> np.ndarray:
    """A synthetic MLO-like mammogram: a bright half-ellipse of textured tissue on a dark film."""
    rows, cols = np.mgrid[0:SIZE, 0:SIZE]
    inside = ((rows - SIZE / 2) / (SIZE * 0.45)) ** 2 + (cols / (SIZE * 0.5)) ** 2 < 1.0
    pixels = rng.integers(0, 12, size=(SIZE, SIZE)).astype(np.float32)
    pixels[inside] = 110 + rng.normal(0, 14, size=int(inside.sum()))
    image = np.clip(pixels, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image[:, ::-1]) if on_right else image


def _tiny_mias(root: Path, patients: int = 18) -> Path:
    """Patients of two images (R odd, L even); a third of the images carry one bright blob."""
    rng = np.random.default_rng(0)
    rows = ["path,ref,patient_id,side,background_tissue,abnormality,severity,x,y,radius,"
            "image_label"]
    number = 0
    for patient in range(1, patients + 1):
        for side in ("R", "L"):
            number += 1
            ref = f"mdb{number:03d}"
            label = MIAS_LABELS[(patient + (side == "L")) % 3]
            image = _breast(rng, on_right=side == "R")
            x = y = radius = ""
            if label != "normal":
                row, col = int(rng.integers(80, 176)), int(rng.integers(20, 90))
                col = SIZE - 1 - col if side == "R" else col
                blob = (np.mgrid[0:SIZE, 0:SIZE][0] - row) ** 2 + (
                    np.mgrid[0:SIZE, 0:SIZE][1] - col) ** 2 < 10**2
                image[blob] = 235 if label == "malignant" else 200
                x, y, radius = str(col), str(SIZE - row), "10"
            (root / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / label / f"{ref}.png")
            kind = "NORM" if label == "normal" else "CIRC"
            severity = {"normal": "", "benign": "B", "malignant": "M"}[label]
            rows.append(f"{label}/{ref}.png,{ref},p{patient:03d},{side},G,{kind},{severity},"
                        f"{x},{y},{radius},{label}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def tiny_mias(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_mias(tmp_path_factory.mktemp("mias"))


@pytest.fixture(scope="module")
def tiny_model(tiny_mias: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mg_run")
    return train("MG", tiny_mias, out, epochs=4, seed=0, max_minutes=600.0, patience=5)


def test_lesion_rows_are_measured_from_the_bottom(tiny_mias: Path) -> None:
    lesions = read_mias_lesions(tiny_mias)
    path, found = next((p, v) for p, v in sorted(lesions.items()) if v)
    image = np.asarray(Image.open(tiny_mias / path))
    lesion = found[0]
    assert image[int(lesion.row), int(lesion.col)] >= 200, "the blob is at (H - y, x)"
    view = working_view(image)
    (row, col, radius, _), = lesion_positions(view, found, image.shape[1])
    assert radius == pytest.approx(10.0 * view.geometry.scale)
    assert view.pixels[int(round(row)), int(round(col))] > view.pixels[view.tissue].mean() + 1.0


def test_working_view_turns_the_chest_wall_left() -> None:
    rng = np.random.default_rng(3)
    left = _breast(rng, on_right=False)
    right = np.ascontiguousarray(left[:, ::-1])
    view_left, view_right = working_view(left), working_view(right)
    assert not view_left.geometry.flipped and view_right.geometry.flipped
    assert np.allclose(view_left.pixels, view_right.pixels)
    assert 0.85 * SIZE < view_left.pixels.shape[0] <= SIZE  # cropped to the breast, scale 1
    assert view_left.tissue.mean() > 0.65, "the crop is mostly breast (a half-ellipse)"
    centres = grid_centres(view_left, PatchSettings())
    assert len(centres) > 10 and view_left.tissue[centres[:, 0], centres[:, 1]].all()


def test_pooling_is_monotone_in_the_lesion_score() -> None:
    settings = PatchSettings(top_k=2, platt_a=1.5, platt_b=-0.5)
    calm = np.tile([0.9, 0.05, 0.05], (20, 1))
    suspicious = calm.copy()
    suspicious[3] = [0.1, 0.2, 0.7]
    suspicious[7] = [0.2, 0.2, 0.6]
    p_calm, _ = image_probabilities(calm, settings)
    p_susp, top = image_probabilities(suspicious, settings)
    assert p_calm.sum() == pytest.approx(1.0) and p_susp.sum() == pytest.approx(1.0)
    assert p_susp[0] < p_calm[0]
    assert sorted(top.tolist()) == [3, 7]
    assert p_susp[2] > p_susp[1], "the top patches say malignant"


def test_bilateral_differences_pair_the_breasts_of_each_woman() -> None:
    scores = [0.9, 0.3, 0.5, 0.5, 0.7]
    women = ["a", "a", "b", "b", "c"]
    out = bilateral_differences(scores, women, 1.0)
    assert out[:4] == pytest.approx([0.6, -0.6, 0.0, 0.0])
    assert np.isnan(out[4]), "no partner: the single-image rule applies"
    assert bilateral_differences(scores, women, 0.5)[0] == pytest.approx(0.9 - 0.15)


def test_training_writes_a_patch_card(tiny_model: Path) -> None:
    card = json.loads(tiny_model.read_text())
    assert card["labels"] == list(MIAS_LABELS)
    assert card["postprocessing_kind"] == "mammo_patch_topk"
    assert card["patch_model"]["top_k"] >= 1
    # the recipe's bilateral rule, its logistic fitted on the validation pairs: a breast that
    # scores above its partner is more likely abnormal
    assert card["patch_model"]["bilateral_lambda"] == 1.0
    assert card["patch_model"]["bilateral_a"] > 0
    for name in ("mg_mias.pt", "mg_mias_ood.npz", "mg_mias_curves.png", "mg_mias_roc.png",
                 "mg_mias_confusion.png", "mg_mias_history.json"):
        assert (tiny_model.parent / name).is_file(), name
    assert card["metrics"]["val"]["n"] > 0
    # bright blobs on a synthetic breast: four epochs find them
    assert card["metrics"]["val_patch_auc"] > 0.7


def test_classifier_serves_a_mammogram(tiny_model: Path, tiny_mias: Path) -> None:
    classifier = classifier_from_card(ModelCard.from_file(tiny_model))
    assert isinstance(classifier, MammoPatchClassifier)
    image = np.asarray(Image.open(tiny_mias / "benign" / "mdb001.png"))  # a right breast
    prediction = classifier.predict(image)
    assert prediction.modality == "MG" and prediction.label in MIAS_LABELS
    assert sum(prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
    assert prediction.heatmap.shape == image.shape and prediction.heatmap.dtype == np.float32
    assert 0.0 <= float(prediction.heatmap.min()) <= float(prediction.heatmap.max()) <= 1.0
    assert prediction.ood_score is not None
    assert prediction.embedding.ndim == 1 and prediction.embedding.dtype == np.float32
    # the heatmap lies in the frame of the image given: mirrored image -> mirrored heatmap
    mirrored = classifier.predict(np.ascontiguousarray(image[:, ::-1]))
    assert mirrored.probabilities == pytest.approx(prediction.probabilities, abs=1e-6)
    assert np.allclose(mirrored.heatmap[:, ::-1], prediction.heatmap, atol=1e-5)
    # the heatmap is over the breast (the right half of this image), not the empty film
    assert prediction.heatmap[:, : SIZE // 4].max() == 0.0
    rgb = np.repeat(image[..., None], 3, axis=2)
    assert classifier.predict(rgb).probabilities == pytest.approx(prediction.probabilities,
                                                                   abs=1e-4)
    blank = classifier.predict(np.zeros((300, 200), dtype=np.uint8))
    assert blank.not_assessable and blank.heatmap.shape == (300, 200)
    with pytest.raises(ValueError, match="uint8"):
        classifier.predict(np.zeros((64, 64), dtype=np.float32))


def test_another_architecture_trains_as_the_patch_network(
    tiny_mias: Path, tmp_path: Path
) -> None:
    """``breastcad train --modality MG --arch NAME``: a network other than the recipe's BusiCNN
    is built at the patch size (one grey channel, three patch classes), trained, written to the
    card and rebuilt from it for serving."""
    card_path = train("MG", tiny_mias, tmp_path, architecture="cnn-rnn", epochs=1, seed=0,
                      max_minutes=600.0, limit=2)
    card = json.loads(card_path.read_text())
    assert card["architecture"] == "CnnRnn"
    assert card["architecture_params"] == {
        "in_channels": 1, "num_classes": 3, "input_size": card["patch_model"]["patch"]}
    classifier = classifier_from_card(ModelCard.from_file(card_path))
    assert type(classifier.module).__name__ == "CnnRnn"
    prediction = classifier.predict(np.asarray(Image.open(tiny_mias / "benign" / "mdb001.png")))
    assert prediction.label in MIAS_LABELS and prediction.ood_score is not None


@pytest.mark.parametrize(
    "architecture", sorted(set(ARCHITECTURES) - {"BusiCNN", "SeedEnsemble"}))
def test_every_architecture_serves_as_the_patch_network(
    architecture: str, tiny_model: Path, tiny_mias: Path, tmp_path: Path
) -> None:
    """Each network of ``inference.networks`` with ``patch_network_params`` slides over a
    mammogram as the patch network: a card naming it (seeded untrained weights, the tiny
    model's pooling) is served with probabilities and a heatmap over the breast only."""
    torch.manual_seed(0)
    params = patch_network_params(architecture, PatchSettings().patch)
    network = build_network(architecture, params)
    torch.save(network.state_dict(), tmp_path / "mg_arch.pt")
    card = json.loads(tiny_model.read_text())
    card.update(architecture=architecture, architecture_params=params, weights="mg_arch.pt",
                sha256=sha256_file(tmp_path / "mg_arch.pt"), ood={})
    (tmp_path / "mg_arch.json").write_text(json.dumps(card))
    classifier = classifier_from_card(ModelCard.from_file(tmp_path / "mg_arch.json"))
    image = np.asarray(Image.open(tiny_mias / "benign" / "mdb001.png"))  # a right breast
    prediction = classifier.predict(image)
    assert sum(prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
    assert prediction.heatmap.shape == image.shape
    assert prediction.heatmap.max() > 0.0
    assert prediction.heatmap[:, : SIZE // 4].max() == 0.0


def test_evaluate_and_load_bundled_take_the_patch_card(tiny_model: Path, tiny_mias: Path) -> None:
    from inference.evaluate import evaluate_folder

    result = evaluate_folder("MG", tiny_mias, model=tiny_model.parent)
    assert result["n"] == 36 and result["model"]["name"] == "mg_mias"
    assert result["auc_abnormal"] is not None
    shipped = tiny_model.parent / "shipped"
    shipped.mkdir()
    for name in ("mg_mias.pt", "mg_mias.json", "mg_mias_ood.npz"):
        shutil.copy(tiny_model.parent / name, shipped / name)
    classifier = load_bundled("MG", directory=shipped)
    assert isinstance(classifier, MammoPatchClassifier)


def test_evaluate_scores_each_breast_against_the_other_with_pairs(
    tiny_model: Path, tiny_mias: Path, tmp_path: Path
) -> None:
    from sklearn.metrics import roc_auc_score

    from inference.dicom_pixels import image_from_file
    from inference.evaluate import EvaluationError, evaluate_folder

    result = evaluate_folder("MG", tiny_mias, model=tiny_model.parent,
                             pairs=tiny_mias / "labels.csv")
    # every image has its partner in the folder; a pair with a not-assessable image is not
    # compared
    assert 0 < result["bilateral_compared"] <= 36
    # the same rule computed by hand from the classifier's single-image scores
    classifier = classifier_from_card(ModelCard.from_file(tiny_model))
    settings = classifier.settings  # type: ignore[attr-defined]
    rows = [line.split(",") for line in (tiny_mias / "labels.csv").read_text().splitlines()[1:]]
    single_image = {r[0]: classifier.predict(image_from_file(tiny_mias / r[0])) for r in rows}
    woman = {r[0]: r[2] for r in rows}
    abnormal, truth = [], []
    for path, own in sorted(single_image.items()):
        [partner] = [single_image[q] for q in single_image if woman[q] == woman[path] and q != path]
        if own.not_assessable or partner.not_assessable:  # nothing to compare: single-image rule
            abnormal.append(1 - own.probabilities["normal"])
        else:
            assert own.raw_score is not None and partner.raw_score is not None
            difference = own.raw_score - settings.bilateral_lambda * partner.raw_score
            abnormal.append(1 / (1 + np.exp(-(settings.bilateral_a * difference
                                              + settings.bilateral_b))))
        truth.append(not path.startswith("normal/"))
    assert result["bilateral_compared"] == sum(
        not (single_image[p].not_assessable or any(
            single_image[q].not_assessable for q in single_image
            if woman[q] == woman[p] and q != p)) for p in single_image)
    assert result["auc_abnormal"] == pytest.approx(roc_auc_score(truth, abnormal), abs=1e-9)
    # single-image scoring when asked: each image's own p(abnormal)
    single = evaluate_folder("MG", tiny_mias, model=tiny_model.parent, pair_breasts=False)
    assert "bilateral_compared" not in single and single["pairs_from"] is None
    assert single["auc_abnormal"] == pytest.approx(roc_auc_score(
        truth, [1 - single_image[p].probabilities["normal"] for p in sorted(single_image)]),
        abs=1e-9)
    with pytest.raises(EvaluationError, match="exclude"):
        evaluate_folder("MG", tiny_mias, model=tiny_model.parent,
                        pairs=tiny_mias / "labels.csv", pair_breasts=False)
    # without a pairs file, the folder's own labels.csv pairs the breasts as --pairs does
    found = evaluate_folder("MG", tiny_mias, model=tiny_model.parent)
    assert found["pairs_from"] == "labels.csv" and result["pairs_from"].endswith("labels.csv")
    assert found["bilateral_compared"] == result["bilateral_compared"]
    assert found["auc_abnormal"] == result["auc_abnormal"]
    assert found["confusion_matrix"] == result["confusion_matrix"]
    # a pairs file without the columns, and a model without the rule, are clear errors
    bad = tmp_path / "pairs.csv"
    bad.write_text("path,side\nbenign/mdb001.png,R\n")
    with pytest.raises(EvaluationError, match="patient_id"):
        evaluate_folder("MG", tiny_mias, model=tiny_model.parent, pairs=bad)
    no_rule = tmp_path / "no_rule"
    no_rule.mkdir()
    for name in ("mg_mias.pt", "mg_mias_ood.npz"):
        shutil.copy(tiny_model.parent / name, no_rule / name)
    card = json.loads(tiny_model.read_text())
    card["patch_model"]["bilateral_lambda"] = 0.0
    (no_rule / "mg_mias.json").write_text(json.dumps(card))
    with pytest.raises(EvaluationError, match="no bilateral rule"):
        evaluate_folder("MG", tiny_mias, model=no_rule, pairs=tiny_mias / "labels.csv")


def test_evaluate_pairs_dicom_mammograms_by_patient_id_and_laterality(
    tiny_model: Path, tiny_mias: Path, tmp_path: Path
) -> None:
    """A folder of DICOM mammograms and no pairs file: PatientID and ImageLaterality pair the
    breasts, exactly as a pairs CSV naming the same women and sides does; a labels.csv of
    another layout is no pairs file. ``breastcad evaluate --single-images`` scores them alone."""
    from pydicom.uid import generate_uid
    from support.dicom_factory import mias_as_mammogram, write_dataset
    from typer.testing import CliRunner

    from dicom_node.cli import app
    from inference.evaluate import evaluate_folder

    rows = [line.split(",") for line in (tiny_mias / "labels.csv").read_text().splitlines()[1:]]
    folder = tmp_path / "dicom"
    pairs = ["path,patient_id,side"]
    for path, _ref, woman, side, *_rest in rows[:12]:  # six women, both breasts each
        relative = f"{path.split('/')[0]}/{Path(path).stem}.dcm"
        write_dataset(mias_as_mammogram(
            tiny_mias / path, side="L" if side == "L" else "R", view="MLO", patient_id=woman,
            study_instance_uid=generate_uid(), series_instance_uid=generate_uid()),
            folder / relative)
        pairs.append(f"{relative},{woman},{side}")
    (folder / "labels.csv").write_text("path,label\n")
    (tmp_path / "pairs.csv").write_text("\n".join(pairs) + "\n")
    found = evaluate_folder("MG", folder, model=tiny_model.parent)
    explicit = evaluate_folder("MG", folder, model=tiny_model.parent, pairs=tmp_path / "pairs.csv")
    assert found["pairs_from"] == "dicom" and found["n"] == 12
    assert found["bilateral_compared"] == explicit["bilateral_compared"] > 0
    assert found["auc_abnormal"] == explicit["auc_abnormal"]
    assert found["confusion_matrix"] == explicit["confusion_matrix"]
    run = CliRunner().invoke(app, ["evaluate", "--modality", "MG", "--data", str(folder),
                                   "--model", str(tiny_model.parent), "--json",
                                   "--single-images"])
    assert run.exit_code == 0, run.output
    alone = json.loads(run.stdout.strip().splitlines()[-1])
    assert alone["pairs_from"] is None and "bilateral_compared" not in alone
    assert alone["n"] == 12


def test_recalibrate_fits_the_operating_point_on_out_of_fold_maps(
    tiny_model: Path, tiny_mias: Path, tmp_path: Path
) -> None:
    import csv

    from inference.datasets import read_mias, split_by_group
    from inference.evaluate import evaluate_folder
    from inference.mammo_cv import (
        cross_validated_calibration,
        load_images,
        recalibrate,
        write_fold,
    )
    from inference.train_mammo import build_records, image_outputs

    card = ModelCard.from_file(tiny_model)
    settings = PatchSettings.from_mapping(card.data["patch_model"])
    split = split_by_group(read_mias(tiny_mias), seed=int(card.data["split"]["seed"]),
                           labels=MIAS_LABELS)
    classifier = classifier_from_card(card)
    with (tiny_mias / "labels.csv").open(newline="") as handle:
        sides = {row["path"]: row["side"] for row in csv.DictReader(handle)}

    def maps(samples: list) -> list[dict]:  # type: ignore[type-arg]
        records = build_records(tiny_mias, samples, MIAS_LABELS, settings)
        outputs = image_outputs(classifier.module, records, settings)
        return [{"path": r.sample.path, "patient": r.sample.group, "side": sides[r.sample.path],
                 "target": r.target, "p": p, "centres": r.grid, "shape": r.view.tissue.shape}
                for r, (p, _) in zip(records, outputs, strict=True)]

    # Stand-ins for out-of-fold maps: the tiny model's own maps of the development images
    # (bench/mg_cv.py makes the real ones with fold models; what is fitted on them is the same).
    development = split["train"] + split["val"]
    cv = tmp_path / "cv"
    cv.mkdir()
    write_fold(cv / "fold0.npz", maps(development))
    new = recalibrate(tiny_model, [cv], tmp_path / "out", data_dir=tiny_mias, version="9.9.9",
                      threads=1)
    data = json.loads(new.read_text())
    expected = cross_validated_calibration(load_images(cv), settings)
    threshold = data["patch_model"]["abnormal_threshold"]
    assert threshold == pytest.approx(expected.abnormal_threshold)
    assert data["patch_model"]["bilateral_a"] == pytest.approx(expected.bilateral_a)
    assert data["version"] == "9.9.9" and data["sha256"] == card.sha256
    assert data["operating_point"]["fitted_on"].startswith(f"{len(development)} development")
    assert "operating point" in data["postprocessing"]
    # AUCs are of the probabilities, unchanged by a monotone recalibration of paired breasts
    assert data["metrics"]["val"]["auc_abnormal"] == pytest.approx(
        card.data["metrics"]["val"]["auc_abnormal"], abs=1e-9)
    # the node serves labels by the operating point, and evaluate scores those labels
    served = classifier_from_card(ModelCard.from_file(new))
    for sample in split["test"] + split["val"]:
        prediction = served.predict(np.asarray(Image.open(tiny_mias / sample.path)))
        assert (prediction.label != "normal") == (
            1.0 - prediction.probabilities["normal"] >= threshold)
    result = evaluate_folder("MG", tiny_mias, model=new.parent)
    matrix = np.array(result["confusion_matrix"])
    assert matrix.sum() == 36 and result["accuracy"] == pytest.approx(np.trace(matrix) / 36)
    # maps that hold a test image are refused: the test split must stay unseen
    leaky = tmp_path / "leaky"
    leaky.mkdir()
    write_fold(leaky / "fold0.npz", maps(development + split["test"][:1]))
    with pytest.raises(ValueError, match="test split"):
        recalibrate(tiny_model, [leaky], tmp_path / "out2", data_dir=tiny_mias, threads=1)


def test_an_unknown_epoch_choice_is_refused_before_any_data_is_read(tmp_path: Path) -> None:
    from inference.train_mammo import recipe_settings, train_patch_model

    with pytest.raises(ValueError, match="select_by"):
        train_patch_model(
            tmp_path / "absent", {"train": [], "val": [], "test": []}, MIAS_LABELS,
            architecture="BusiCNN", params=patch_network_params("BusiCNN", 64),
            settings=recipe_settings(), epochs=1, lr=1e-3, weight_decay=0.0, batch_size=8,
            patience=1, max_minutes=1.0, seed=0, started=0.0, select_by="val_loss",
        )
