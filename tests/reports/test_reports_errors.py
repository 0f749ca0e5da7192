"""Inputs build_results cannot turn into valid objects raise a clear ValueError."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from pydicom import Dataset

from inference.prediction import Prediction
from reports import build_results

ROWS, COLUMNS = 96, 128


def _image() -> np.ndarray:
    return np.zeros((ROWS, COLUMNS, 3), dtype=np.uint8)


def test_unknown_label_is_refused(make_source: Callable[..., Dataset],
                                  make_prediction: Callable[..., Prediction]) -> None:
    prediction = make_prediction(ROWS, COLUMNS, label="cyst", labels=("cyst", "solid"))
    with pytest.raises(ValueError, match="no coded concept for class label 'cyst'"):
        build_results([make_source()], [_image()], [prediction], series_prediction=prediction,
                      software_version="0.1.0")


def test_unknown_class_among_the_labels_is_refused(
    make_source: Callable[..., Dataset], make_prediction: Callable[..., Prediction]
) -> None:
    prediction = make_prediction(ROWS, COLUMNS, label="malignant",
                                 labels=("malignant", "artefact"))
    with pytest.raises(ValueError, match="'artefact'"):
        build_results([make_source()], [_image()], [prediction], series_prediction=prediction,
                      software_version="0.1.0")


def test_unknown_modality_is_refused(make_source: Callable[..., Dataset],
                                     make_prediction: Callable[..., Prediction]) -> None:
    prediction = make_prediction(ROWS, COLUMNS)
    with pytest.raises(ValueError, match="no procedure code for Modality 'CT'"):
        build_results([make_source(modality="CT")], [_image()], [prediction],
                      series_prediction=prediction, software_version="0.1.0")


def test_counts_must_match(make_source: Callable[..., Dataset],
                           make_prediction: Callable[..., Prediction]) -> None:
    prediction = make_prediction(ROWS, COLUMNS)
    with pytest.raises(ValueError, match="one image and one prediction per source"):
        build_results([make_source(1), make_source(2)], [_image()], [prediction],
                      series_prediction=prediction, software_version="0.1.0")
    with pytest.raises(ValueError, match="no source instances"):
        build_results([], [], [], series_prediction=prediction, software_version="0.1.0")


def test_sources_must_be_one_series(make_source: Callable[..., Dataset],
                                    make_prediction: Callable[..., Prediction]) -> None:
    prediction = make_prediction(ROWS, COLUMNS)
    sources = [make_source(1), make_source(2, series_uid="1.2.826.0.1.3680043.8.498.1.99")]
    with pytest.raises(ValueError, match="not from one series"):
        build_results(sources, [_image()] * 2, [prediction] * 2, series_prediction=prediction,
                      software_version="0.1.0")
    with pytest.raises(ValueError, match="more than once"):
        build_results([make_source(1), make_source(1)], [_image()] * 2, [prediction] * 2,
                      series_prediction=prediction, software_version="0.1.0")


def test_source_needs_its_uids(make_source: Callable[..., Dataset],
                               make_prediction: Callable[..., Prediction]) -> None:
    source = make_source()
    del source.SOPInstanceUID
    prediction = make_prediction(ROWS, COLUMNS)
    with pytest.raises(ValueError, match=r"sources\[0\] lacks SOPInstanceUID"):
        build_results([source], [_image()], [prediction], series_prediction=prediction,
                      software_version="0.1.0")


@pytest.mark.parametrize("image", [
    np.zeros((ROWS + 1, COLUMNS, 3), np.uint8),
    np.zeros((ROWS, COLUMNS), np.uint8),
    np.zeros((ROWS, COLUMNS, 3), np.uint16),
])
def test_image_must_be_the_sources_rgb_pixels(make_source: Callable[..., Dataset],
                                              make_prediction: Callable[..., Prediction],
                                              image: np.ndarray) -> None:
    prediction = make_prediction(ROWS, COLUMNS)
    with pytest.raises(ValueError, match=r"images\[0\]"):
        build_results([make_source()], [image], [prediction], series_prediction=prediction,
                      software_version="0.1.0")


def test_predictions_must_come_from_one_model(make_source: Callable[..., Dataset],
                                              make_prediction: Callable[..., Prediction]) -> None:
    series = make_prediction(ROWS, COLUMNS)
    other = make_prediction(ROWS, COLUMNS, model_version="9.9")
    with pytest.raises(ValueError, match=r"predictions\[0\] comes from model"):
        build_results([make_source()], [_image()], [other], series_prediction=series,
                      software_version="0.1.0")


def test_probabilities_must_be_probabilities(make_source: Callable[..., Dataset],
                                             make_prediction: Callable[..., Prediction]) -> None:
    prediction = make_prediction(ROWS, COLUMNS, probabilities={"normal": 0.1, "benign": 0.2,
                                                               "malignant": 1.7})
    with pytest.raises(ValueError, match="not in \\[0, 1\\]"):
        build_results([make_source()], [_image()], [prediction], series_prediction=prediction,
                      software_version="0.1.0")


@pytest.mark.parametrize(("manufacturer", "software_version"), [("", "0.1.0"),
                                                                ("breastcad", ""),
                                                                ("x" * 65, "0.1.0")])
def test_equipment_text_must_be_valid(make_source: Callable[..., Dataset],
                                      make_prediction: Callable[..., Prediction],
                                      manufacturer: str, software_version: str) -> None:
    prediction = make_prediction(ROWS, COLUMNS)
    with pytest.raises(ValueError):
        build_results([make_source()], [_image()], [prediction], series_prediction=prediction,
                      manufacturer=manufacturer, software_version=software_version)
