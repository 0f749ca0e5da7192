"""Whole-slide analysis: reading pyramids, tissue, tiling, the tile map and the slide result.

Slides are real DICOM pyramids written by ``support.wsi_factory`` (checked with dciodvfy) and
read back through wsidicom; the realistic one is a TEST-split patient's real IDC patches at their
positions. Tests of mechanics use a small untrained patch model (its outputs are meaningless but
deterministic); the IoU test needs the bundled SM model and skips without it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.uid import JPEG2000, ExplicitVRLittleEndian, JPEGBaseline8Bit
from support.dcmtk import dciodvfy, require_tool
from support.wsi_factory import (
    IDC_MPP,
    assemble_patient,
    canvas_render,
    glass,
    grid_iou,
    make_patch_model,
    split_test_patients,
    write_patient_slide,
    write_pyramid,
)

from inference import Classifier, ModelNotAvailableError, load_bundled
from inference.card import ModelCard
from inference.wsi.aggregator import (
    AGGREGATOR_NAME,
    AttentionStream,
    GatedAttentionMIL,
    load_aggregator,
)
from inference.wsi.analysis import RULE_NAME, TileClassifier, analyse_slide
from inference.wsi.slide import SlideError, WholeSlide
from inference.wsi.split import patches_by_split, read_idc_patches, split_patients
from inference.wsi.tissue import otsu_threshold, saturation, tissue_mask
from inference.wsi.train_aggregator import assemble_bags


@pytest.fixture(scope="module")
def idc_dir(shared_data: Path) -> Path:
    path = shared_data / "idc-breast-histopathology"
    if not (path / "labels.csv").is_file():
        pytest.skip(f"IDC patches not found at {path}")
    return path


@pytest.fixture(scope="module")
def untrained(tmp_path_factory: pytest.TempPathFactory) -> Classifier:
    card = make_patch_model(tmp_path_factory.mktemp("sm-model"))
    return Classifier.from_card(ModelCard.from_file(card))


@pytest.fixture(scope="module")
def patient_slide(
    idc_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[list[Path], object]:
    patient = split_test_patients(idc_dir)[0]
    return write_patient_slide(idc_dir, patient, tmp_path_factory.mktemp("slide"))


# -- tissue ---------------------------------------------------------------------------------


def test_otsu_splits_two_populations() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.03, 0.01, 5000), rng.normal(0.45, 0.05, 2000)])
    threshold = otsu_threshold(np.clip(values, 0, 1))
    assert 0.08 < threshold < 0.35


def test_tissue_mask_finds_stained_tissue_not_glass_or_black() -> None:
    image = glass(100, 100, seed=1)
    image[20:60, 30:70] = (200, 120, 170)  # eosin-pink tissue
    image[80:95, 0:20] = (5, 5, 5)  # scanner padding
    mask, threshold = tissue_mask(image)
    assert mask[20:60, 30:70].all()
    assert not mask[80:95, 0:20].any()
    assert mask.sum() == 40 * 40
    assert 0.05 <= threshold <= 0.09
    assert saturation(image)[0, 0] < 0.05


def test_empty_glass_has_no_tissue() -> None:
    mask, _ = tissue_mask(glass(64, 64, seed=2))
    assert not mask.any()


# -- reading pyramids -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sm_image.dcm", "sm_image_jpegls.dcm", "sm_image_grayscale.dcm"])
def test_samples_open_and_read_like_pydicom(dicom_samples: Path, name: str) -> None:
    path = dicom_samples / "SM" / name
    ds = pydicom.dcmread(path)
    with WholeSlide.open([path]) as slide:
        assert slide.base.width == ds.TotalPixelMatrixColumns
        assert slide.base.mpp == pytest.approx(float(ds.SharedFunctionalGroupsSequence[0]
                                                     .PixelMeasuresSequence[0].PixelSpacing[0])
                                               * 1000)
        region = slide.read(slide.base, 0, 0, 10, 10)
    frame = ds.pixel_array[0]  # TILED_FULL: frame 1 is the top-left tile
    if frame.ndim == 2:
        frame = np.repeat(frame[:, :, None], 3, axis=2)
    assert region.shape == (10, 10, 3) and region.dtype == np.uint8
    np.testing.assert_array_equal(region, frame)


def test_sample_slide_smaller_than_a_tile_fails_with_reason(
    dicom_samples: Path, untrained: Classifier
) -> None:
    path = dicom_samples / "SM" / "sm_image_jpegls.dcm"
    with (
        WholeSlide.open([path]) as slide,
        pytest.raises(SlideError, match="smaller than one 200 µm analysis tile"),
    ):
        analyse_slide(slide, untrained)


def test_non_slide_files_are_refused(dicom_samples: Path) -> None:
    with pytest.raises(SlideError, match="cannot open the whole-slide pyramid"):
        WholeSlide.open([dicom_samples / "SM" / "sm_annotations.dcm"])


@pytest.mark.parametrize("syntax", [JPEGBaseline8Bit, JPEG2000, ExplicitVRLittleEndian])
def test_factory_pyramid_is_valid_and_reads_back(tmp_path: Path, syntax: str) -> None:
    require_tool("dciodvfy")
    rng = np.random.default_rng(3)
    canvas = rng.integers(0, 255, size=(300, 520, 3), dtype=np.uint8)
    canvas[:, :] = np.clip(canvas.astype(np.int16) // 8 + (180, 100, 160), 0, 255)
    paths = write_pyramid(tmp_path, canvas_render(canvas), 520, 300, 2.0, transfer_syntax=syntax,
                          tile=128)
    assert len(paths) == 3  # 520 -> 260 -> 130 (<= 256 on both sides)
    for path in paths:
        result = dciodvfy(path)
        assert result.ok, result.errors
    with WholeSlide.open(paths) as slide:
        assert [(lv.level, lv.width, lv.height) for lv in slide.levels] == [
            (0, 520, 300), (1, 260, 150), (2, 130, 75)]
        assert [lv.mpp for lv in slide.levels] == [2.0, 4.0, 8.0]
        assert slide.level_for_spacing(4.0).level == 1
        assert slide.level_for_spacing(4.9).level == 1  # 8 µm is too coarse for 4.9
        assert slide.level_for_spacing(7.0).level == 2  # within the 25% tolerance
        region = slide.read(slide.base, 100, 50, 200, 100)
        outside = slide.read(slide.base, 500, 280, 40, 40)
    error = np.abs(region.astype(int) - canvas[50:150, 100:300].astype(int)).mean()
    assert error < (0.5 if syntax == ExplicitVRLittleEndian else 8.0)
    assert (outside[20:, :] == 255).all() and (outside[:, 20:] == 255).all()


def test_coarse_slide_is_refused(tmp_path: Path, untrained: Classifier) -> None:
    canvas = np.full((200, 200, 3), 200, dtype=np.uint8)
    paths = write_pyramid(tmp_path, canvas_render(canvas), 200, 200, 10.0, levels=1)
    with WholeSlide.open(paths) as slide, pytest.raises(SlideError, match="coarser than"):
        analyse_slide(slide, untrained)


# -- tiles, streaming, aggregation ----------------------------------------------------------


def test_tile_classifier_matches_predict_batch(untrained: Classifier, idc_dir: Path) -> None:
    patches = [p for p in read_idc_patches(idc_dir)[:40]]
    from inference.wsi.train_aggregator import patch_pixels

    tiles = [patch_pixels(idc_dir, p) for p in patches]
    probabilities, embeddings = TileClassifier(untrained)(tiles)
    reference = untrained.predict_batch(tiles)
    np.testing.assert_allclose(
        probabilities[:, 1], [p.probabilities["idc"] for p in reference], atol=1e-5
    )
    np.testing.assert_allclose(embeddings, np.stack([p.embedding for p in reference]), atol=1e-4)


@pytest.mark.parametrize("model", ["bundled", "untrained"])
def test_batch_preprocessing_equals_the_per_tile_transform(
    model: str, untrained: Classifier, idc_dir: Path
) -> None:
    """The vectorised preprocessing gives the classifier's own MONAI transform's numbers
    (fixed per-channel standardisation of RGB for sm_idc; grey and per-image z-score for the
    untrained model), and the tile probabilities equal the per-tile path's."""
    if model == "bundled":
        try:
            classifier = load_bundled("SM")
        except ModelNotAvailableError as exc:
            pytest.skip(f"needs the bundled SM patch model: {exc}")
    else:
        classifier = untrained
    from inference.wsi.train_aggregator import patch_pixels

    tiles = np.stack([patch_pixels(idc_dir, p) for p in read_idc_patches(idc_dir)[:48]])
    tiles[5] = 200  # a uniform tile: MONAI's z-score of it is rounding noise, reproduced
    tile_classifier = TileClassifier(classifier)
    batch = tile_classifier.preprocess(tiles)
    per_tile = torch.stack([classifier.preprocess(tile) for tile in tiles])
    assert batch.shape == per_tile.shape and batch.is_contiguous()
    np.testing.assert_allclose(batch.numpy(), per_tile.numpy(), atol=1e-6)
    probabilities, embeddings = tile_classifier(tiles)
    reference = classifier.predict_batch(list(tiles))
    positive = classifier.labels[tile_classifier.positive_index]
    np.testing.assert_allclose(
        probabilities[:, tile_classifier.positive_index],
        [p.probabilities[positive] for p in reference],
        atol=1e-5,
    )
    np.testing.assert_allclose(embeddings, np.stack([p.embedding for p in reference]), atol=1e-4)


def test_the_network_sees_batches_of_one_shape(
    patient_slide: tuple[list[Path], object], untrained: Classifier
) -> None:
    """Every batch has exactly ``batch_size`` tiles, whatever the blocks hold and however many
    tiles the slide has (the CPU convolutions keep memory per input shape: batches of varying
    size made the process grow with the slide), and each tile is counted once."""
    paths, _ = patient_slide
    sizes: list[int] = []
    network = untrained.network
    forward = network.forward_features

    def recording(x: torch.Tensor) -> torch.Tensor:
        sizes.append(int(x.shape[0]))
        return forward(x)

    network.forward_features = recording  # type: ignore[method-assign]
    try:
        with WholeSlide.open(paths) as slide:
            result = analyse_slide(slide, untrained, batch_size=10, block_tiles=3)
    finally:
        del network.forward_features
    views = 2 if untrained.card.hflip_tta else 1
    assert result.tissue_tiles % 10, "pick a batch size that leaves a partial last batch"
    assert sizes == [10 * views] * -(-result.tissue_tiles // 10), sizes
    assert int(np.count_nonzero(~np.isnan(result.probability_map))) == result.tissue_tiles


def test_block_tiles_cut_and_resize_like_one_tile_at_a_time() -> None:
    """At exactly 4 µm/pixel a block is cut by one reshape; at another spacing (55 px per
    200 µm tile, a 3.64 µm level) each tile is cut at its rounded position and resized."""
    from PIL import Image

    from inference.wsi.analysis import _block_tiles

    rng = np.random.default_rng(5)
    tissue = rng.random((3, 4)) < 0.6
    tissue[0, 0] = True
    region = rng.integers(0, 256, size=(150, 200, 3), dtype=np.uint8)
    cut = _block_tiles(region, tissue, 7, 9, 50.0)
    positions = list(zip(*np.nonzero(tissue), strict=True))
    expected = [region[r * 50 : r * 50 + 50, c * 50 : c * 50 + 50] for r, c in positions]
    np.testing.assert_array_equal(cut, np.stack(expected))
    side = 55.0
    region = rng.integers(0, 256, size=(170, 225, 3), dtype=np.uint8)
    resized = _block_tiles(region, tissue, 7, 9, side)
    expected = []
    for r, c in positions:
        x, y = round((9 + c) * side) - round(9 * side), round((7 + r) * side) - round(7 * side)
        tile = np.ascontiguousarray(region[y : y + 55, x : x + 55])
        image = Image.fromarray(tile).resize((50, 50), Image.Resampling.BILINEAR)
        expected.append(np.asarray(image))
    assert resized.shape == (int(tissue.sum()), 50, 50, 3)
    np.testing.assert_array_equal(resized, np.stack(expected))


def test_attention_stream_equals_the_whole_bag() -> None:
    torch.manual_seed(0)
    model = GatedAttentionMIL(16, hidden=8).eval()
    bag = torch.randn(103, 16) * 3
    with torch.no_grad():
        expected = torch.softmax(model(bag), dim=0).numpy()
    stream = AttentionStream(model)
    for start in range(0, 103, 10):  # batches in reading order
        stream.update(bag[start : start + 10].numpy())
    np.testing.assert_allclose(stream.probabilities(), expected, atol=1e-6)


def test_patient_split_is_deterministic_and_disjoint(idc_dir: Path) -> None:
    patches = read_idc_patches(idc_dir)
    split = split_patients(patches)
    again = split_patients(list(reversed(patches)))
    assert split == again
    train, val, test = (set(split[name]) for name in ("train", "val", "test"))
    assert not (train & val or train & test or val & test)
    # the patch model's split (inference.datasets), 70/15/15 of the patients in each stratum
    assert abs(len(test) - 0.15 * len(train | val | test)) <= 2
    by_split = patches_by_split(patches)
    assert sum(len(v) for v in by_split.values()) == len(patches)


def test_training_bags_come_from_one_split_with_the_right_labels(idc_dir: Path) -> None:
    train = patches_by_split(read_idc_patches(idc_dir))["train"]
    bags = assemble_bags(train, 200, np.random.default_rng(0))
    assert sum(label for _, label in bags) == 100
    for indices, label in bags:
        labels = {train[i].label for i in indices}
        assert (1 in labels) == bool(label)
        assert len(indices) >= 8 and len(set(indices.tolist())) == len(indices)


def test_aggregator_only_loads_for_its_patch_model(tmp_path: Path, untrained: Classifier) -> None:
    model = GatedAttentionMIL(16, hidden=8)
    weights = tmp_path / f"{AGGREGATOR_NAME}.pt"
    torch.save(model.state_dict(), weights)
    from inference.card import sha256_file

    card = {
        "name": AGGREGATOR_NAME, "version": "9.9.9", "architecture": "GatedAttentionMIL",
        "architecture_params": {"in_features": 16, "hidden": 8, "num_classes": 2},
        "labels": ["non_idc", "idc"], "weights": weights.name, "sha256": sha256_file(weights),
        "patch_model": {"name": "other", "version": "1", "sha256": "0" * 64},
    }
    path = tmp_path / f"{AGGREGATOR_NAME}.card"
    path.write_text(json.dumps(card))
    assert load_aggregator(untrained.card, tmp_path) is None  # trained on another patch model
    card["patch_model"] = {"sha256": untrained.card.sha256}
    path.write_text(json.dumps(card))
    loaded = load_aggregator(untrained.card, tmp_path)
    assert loaded is not None and loaded.version == "9.9.9"
    weights.write_bytes(weights.read_bytes() + b"x")
    with pytest.raises(ValueError, match="sha256"):
        load_aggregator(untrained.card, tmp_path)


def test_bundled_aggregator_card_is_not_taken_for_a_classifier() -> None:
    from inference.bundled import bundled_cards

    assert all(card.name != AGGREGATOR_NAME for card in bundled_cards())


# -- the realistic slide ---------------------------------------------------------------------


def test_pipeline_mechanics_on_a_patient_slide(
    patient_slide: tuple[list[Path], object], untrained: Classifier, tmp_path: Path
) -> None:
    paths, assembled = patient_slide
    truth = assembled.truth  # type: ignore[attr-defined]
    with WholeSlide.open(paths) as slide:
        assert slide.base.mpp == pytest.approx(IDC_MPP / 2)
        small_batches = analyse_slide(slide, untrained, batch_size=7, block_tiles=3)
        big_batches = analyse_slide(slide, untrained, batch_size=512, block_tiles=64)
    # the tiles are read at 4 µm/pixel from the pyramid's level 1, one tile per patch
    assert small_batches.level.level == 1
    assert small_batches.probability_map.shape == truth.shape
    # tissue detection finds the patches (pale ones may be missed) and little else
    assert grid_iou(small_batches.tissue, truth >= 0) >= 0.75
    # batching and block size change nothing
    np.testing.assert_allclose(
        np.nan_to_num(small_batches.probability_map, nan=-1),
        np.nan_to_num(big_batches.probability_map, nan=-1),
        atol=1e-5,
    )
    result = small_batches
    assert result.aggregator == RULE_NAME
    assert result.tissue_area_mm2 == pytest.approx(result.tissue_tiles * 0.04)
    assert 0 <= result.positive_fraction <= 1
    assert sum(result.slide_probabilities.values()) == pytest.approx(1.0)
    heatmap = result.heatmap()
    assert heatmap.shape == result.thumbnail.shape[:2]
    assert np.isfinite(heatmap).all() and heatmap.min() >= 0 and heatmap.max() <= 1


def test_tile_map_finds_the_known_idc_patches(
    patient_slide: tuple[list[Path], object], idc_dir: Path, tmp_path: Path
) -> None:
    try:
        classifier = load_bundled("SM")
    except ModelNotAvailableError as exc:
        pytest.skip(f"needs the bundled SM patch model: {exc}")
    ious = []
    for patient in split_test_patients(idc_dir)[:3]:
        out = tmp_path / patient
        paths, assembled = write_patient_slide(idc_dir, patient, out)
        with WholeSlide.open(paths) as slide:
            result = analyse_slide(slide, classifier, load_aggregator(classifier.card))
        iou = grid_iou(result.positive_mask, assembled.truth == 1)
        ious.append(iou)
        print(f"patient {patient}: tile-map IoU {iou:.3f} vs {int((assembled.truth == 1).sum())} "
              f"IDC patches; slide p={result.slide_probabilities}")
        shutil.rmtree(out)
    assert float(np.mean(ious)) >= 0.5, ious


def test_assembled_slide_holds_the_patches_where_their_names_say(idc_dir: Path) -> None:
    patient = split_test_patients(idc_dir)[0]
    assembled = assemble_patient(idc_dir, patient)
    patch = assembled.patches[0]
    x0 = min(p.x for p in assembled.patches) - 100
    y0 = min(p.y for p in assembled.patches) - 100
    from support.wsi_factory import load_patch

    pixels = load_patch(idc_dir, patch)
    h, w = pixels.shape[:2]
    np.testing.assert_array_equal(
        assembled.canvas[patch.y - y0 : patch.y - y0 + h, patch.x - x0 : patch.x - x0 + w], pixels
    )
    assert assembled.truth[(patch.y - y0) // 50, (patch.x - x0) // 50] == patch.label
    assert patient in split_patients(read_idc_patches(idc_dir))["test"]


def test_sparse_pyramid_gives_the_same_tile_map(
    idc_dir: Path, untrained: Classifier, tmp_path: Path
) -> None:
    """TILED_SPARSE (bare-glass tiles left out, per-frame positions) reads like TILED_FULL."""
    require_tool("dciodvfy")
    patient = split_test_patients(idc_dir)[1]
    full, _ = write_patient_slide(idc_dir, patient, tmp_path / "full")
    sparse, _ = write_patient_slide(idc_dir, patient, tmp_path / "sparse", sparse=True)
    base = pydicom.dcmread(sparse[0], stop_before_pixels=True)
    assert base.DimensionOrganizationType == "TILED_SPARSE"
    assert int(base.NumberOfFrames) < -(-base.TotalPixelMatrixColumns // 256) * -(
        -base.TotalPixelMatrixRows // 256
    )
    errors = dciodvfy(sparse[0]).errors
    # dicom3tools checks the frame count of every tiled image against a full tiling, sparse or
    # not (PS3.3 sets no such count for TILED_SPARSE); that is the only complaint
    assert all("NumberOfFrames does not match expected value" in e for e in errors), errors
    with WholeSlide.open(full) as slide:
        a = analyse_slide(slide, untrained)
    with WholeSlide.open(sparse) as slide:
        b = analyse_slide(slide, untrained)
    np.testing.assert_array_equal(a.tissue, b.tissue)
    pa, pb = a.probability_map[a.tissue], b.probability_map[b.tissue]
    # a tile reaching into a left-out frame reads white (255) there instead of glass (238)
    assert np.mean(np.abs(pa - pb) < 1e-5) >= 0.97
    np.testing.assert_allclose(pa, pb, atol=0.05)
