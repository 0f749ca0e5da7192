"""The heatmap overlay and its Secondary Capture: same geometry, visibly changed where hot."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import Dataset

from inference.prediction import Prediction
from reports import build_results, overlay_png, render_overlay

ROWS, COLUMNS = 240, 320
CENTRE = (170, 230)  # well away from the legend in the top-left corner


def _grey(rows: int = ROWS, columns: int = COLUMNS, level: int = 128) -> np.ndarray:
    return np.full((rows, columns, 3), level, dtype=np.uint8)


def _roundtrip(ds: Dataset) -> Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def test_overlay_changes_the_image_where_the_heatmap_is_hot(
    make_prediction: Callable[..., Prediction], hot_spot: Callable[..., np.ndarray]
) -> None:
    image = _grey()
    heatmap = hot_spot(ROWS, COLUMNS, centre=CENTRE, radius=20)
    out = render_overlay(image, make_prediction(ROWS, COLUMNS, heatmap=heatmap))
    assert out.shape == image.shape and out.dtype == np.uint8
    r, c = CENTRE
    hot = out[r - 3:r + 4, c - 3:c + 4].astype(int)
    source = image[r - 3:r + 4, c - 3:c + 4].astype(int)
    # 40 % of jet's dark red over grey 128: green and blue drop, red stays.
    assert np.abs(hot - source).max() >= 40
    assert hot[..., 2].mean() < source[..., 2].mean() - 40
    assert hot[..., 0].mean() > hot[..., 2].mean() + 40
    # A cold corner (not the legend) is tinted blue instead.
    cold = out[-5:, -5:].astype(int)
    assert cold[..., 2].mean() > cold[..., 0].mean() + 40


def test_overlay_differs_with_and_without_a_hot_spot(
    make_prediction: Callable[..., Prediction], hot_spot: Callable[..., np.ndarray]
) -> None:
    image = _grey()
    flat = render_overlay(image, make_prediction(ROWS, COLUMNS,
                                                 heatmap=np.zeros((ROWS, COLUMNS), np.float32)))
    spot = render_overlay(image, make_prediction(
        ROWS, COLUMNS, heatmap=hot_spot(ROWS, COLUMNS, centre=CENTRE, radius=20)))
    r, c = CENTRE
    assert np.abs(spot[r, c].astype(int) - flat[r, c].astype(int)).max() >= 40
    assert np.array_equal(spot[5:40, -40:-5], flat[5:40, -40:-5])  # far from the spot: same


def test_legend_is_burned_in(make_prediction: Callable[..., Prediction]) -> None:
    image = _grey(level=200)
    out = render_overlay(image, make_prediction(ROWS, COLUMNS))
    assert out[1, 1].tolist() == [0, 0, 0]  # the legend's black box
    corner = out[:60, :200].astype(int)
    assert (corner.min(axis=-1) > 200).any()  # white text
    assert ((corner[..., 0] > 200) & (corner[..., 1] > 200) & (corner[..., 2] == 0)).any()


def test_png_is_the_same_picture(make_prediction: Callable[..., Prediction]) -> None:
    image = _grey()
    prediction = make_prediction(ROWS, COLUMNS)
    decoded = np.asarray(Image.open(io.BytesIO(overlay_png(image, prediction))).convert("RGB"))
    assert np.array_equal(decoded, render_overlay(image, prediction))


def test_a_smaller_heatmap_is_resized(make_prediction: Callable[..., Prediction],
                                      hot_spot: Callable[..., np.ndarray]) -> None:
    small = hot_spot(ROWS // 8, COLUMNS // 8, centre=(CENTRE[0] / 8, CENTRE[1] / 8), radius=3)
    out = render_overlay(_grey(), make_prediction(ROWS, COLUMNS, heatmap=small))
    r, c = CENTRE
    assert out.shape == (ROWS, COLUMNS, 3)
    assert int(out[r, c, 0]) > int(out[r, c, 2]) + 40


@pytest.mark.parametrize(("heatmap", "message"), [
    (np.full((ROWS, COLUMNS), 1.5, np.float32), r"\[0, 1\]"),
    (np.full((ROWS, COLUMNS), -0.5, np.float32), r"\[0, 1\]"),
    (np.full((ROWS, COLUMNS), np.nan, np.float32), "NaN"),
])
def test_a_bad_heatmap_is_refused(make_prediction: Callable[..., Prediction], heatmap: np.ndarray,
                                  message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render_overlay(_grey(), make_prediction(ROWS, COLUMNS, heatmap=heatmap))


@pytest.mark.parametrize("image", [
    np.zeros((ROWS, COLUMNS), np.uint8),
    np.zeros((ROWS, COLUMNS, 3), np.float32),
    np.zeros((ROWS, COLUMNS, 4), np.uint8),
])
def test_a_bad_image_is_refused(make_prediction: Callable[..., Prediction],
                                image: np.ndarray) -> None:
    with pytest.raises(ValueError, match="image must"):
        render_overlay(image, make_prediction(ROWS, COLUMNS))


def test_sc_pixels_are_the_overlay(make_source: Callable[..., Dataset],
                                   make_prediction: Callable[..., Prediction],
                                   hot_spot: Callable[..., np.ndarray]) -> None:
    source = make_source(1, rows=ROWS, columns=COLUMNS, laterality="R")
    image = source.pixel_array
    prediction = make_prediction(ROWS, COLUMNS,
                                 heatmap=hot_spot(ROWS, COLUMNS, centre=CENTRE, radius=20))
    results = build_results([source], [image], [prediction], series_prediction=prediction,
                            software_version="0.1.0")
    assert len(results.heatmaps) == 1
    sc = _roundtrip(results.heatmaps[0])
    assert (sc.Rows, sc.Columns) == (source.Rows, source.Columns)
    assert (sc.SamplesPerPixel, sc.PhotometricInterpretation, sc.BitsAllocated) == (3, "RGB", 8)
    pixels = sc.pixel_array
    assert pixels.dtype == np.uint8
    assert np.array_equal(pixels, render_overlay(image, prediction))
    r, c = CENTRE
    assert np.abs(pixels[r - 3:r + 4, c - 3:c + 4].astype(int)
                  - image[r - 3:r + 4, c - 3:c + 4].astype(int)).mean() >= 20
    # Attributes a viewer and a PACS rely on.
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    assert sc.BurnedInAnnotation == "YES"
    assert sc.SeriesDescription == "breastcad AI heatmap"
    assert sc.Laterality == "R"
    assert sc.Manufacturer == "breastcad"
    assert sc.SoftwareVersions == "0.1.0"
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.PatientName == source.PatientName and sc.PatientID == source.PatientID
    (reference,) = sc.SourceImageSequence
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert reference.ReferencedSOPClassUID == source.SOPClassUID


def test_sc_copies_patient_orientation_and_laterality(
    make_source: Callable[..., Dataset], make_prediction: Callable[..., Prediction]
) -> None:
    oriented = make_source(1, rows=ROWS, columns=COLUMNS)
    oriented.PatientOrientation = ["A", "FR"]
    oriented.Laterality = "L"
    bare = make_source(2, rows=ROWS, columns=COLUMNS)
    images = [np.zeros((ROWS, COLUMNS, 3), np.uint8)] * 2
    predictions = [make_prediction(ROWS, COLUMNS)] * 2
    first, second = build_results([oriented, bare], images, predictions,
                                  series_prediction=predictions[0],
                                  software_version="0.1.0").heatmaps
    assert list(first.PatientOrientation) == ["A", "FR"]
    assert first.Laterality == "L"
    # Unknown: present and empty (Type 2C), never a made-up value.
    assert "PatientOrientation" in second and not second.PatientOrientation
    assert "Laterality" in second and second.Laterality == ""
