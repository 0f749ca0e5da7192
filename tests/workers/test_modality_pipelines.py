"""The modality pipelines (workers/mammo.py, workers/ultrasound.py) on real images.

Ultrasound runs the real bundled model. The mammography geometry tests use a transparent test
double (``BrightnessModel``): the bundled MG model is not on this branch yet, and what is checked
here (which way the model sees the breast, that its heatmap comes back in the orientation the
radiologist sees, how views combine into breasts) must hold for any classifier. The double's
heatmap is its input's brightness and its probability of malignancy the brightness of the
input's left half, so both tell what the model was given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from support.untrained_mg import write_untrained_mg_model

from inference import (
    Classifier,
    ModelNotAvailableError,
    Prediction,
    image_from_dataset,
    load_bundled,
)
from inference.dicom_pixels import ultrasound_region
from inference.paths import shared_data_dir
from reports import build_results
from reports.triage import suspicion
from workers import mammo, ultrasound
from workers.analysis import PipelineError
from workers.tasks import analyse_instance

LABELS = ("normal", "benign", "malignant")
MG_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"


class BrightnessModel:
    """Test double of an MG classifier (see the module docstring)."""

    def __init__(self) -> None:
        self.inputs: list[np.ndarray] = []

    def predict(self, image: np.ndarray) -> Prediction:
        self.inputs.append(image)
        gray = image.mean(axis=2) / 255.0
        left = float(gray[:, : gray.shape[1] // 2].mean())
        p_malignant = float(np.clip(left, 0.0, 1.0))
        probabilities = {"normal": (1 - p_malignant) / 2, "benign": (1 - p_malignant) / 2,
                         "malignant": p_malignant}
        return Prediction(
            modality="MG", label=max(LABELS, key=lambda k: probabilities[k]), labels=LABELS,
            probabilities=probabilities, model_name="brightness-double", model_version="0",
            model_sha256="0" * 64, heatmap=gray.astype(np.float32),
            embedding=np.zeros(4, np.float32),
        )

    def predict_batch(self, images: Sequence[np.ndarray], batch_size: int = 16) -> list[Prediction]:
        return [self.predict(image) for image in images]


@pytest.fixture(scope="module")
def samples() -> Path:
    path = shared_data_dir() / "dicom-samples"
    if not path.is_dir():
        pytest.skip(f"no DICOM samples at {path}")
    return path


@pytest.fixture(scope="module")
def us_model() -> Classifier:
    return load_bundled("US")


def _mias(name: str) -> np.ndarray:
    folder = shared_data_dir() / "mini-mias"
    matches = sorted(folder.glob(f"*/{name}.png"))
    if not matches:
        pytest.skip(f"mini-MIAS image {name} not in {folder}")
    with Image.open(matches[0]) as im:
        return np.asarray(im.convert("L"))[::4, ::4]


def _mg(pixels: np.ndarray, side: str, view: str, orientation: list[str] | None) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MG_PRESENTATION
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "MG"
    ds.ImageLaterality = side
    ds.ViewPosition = view
    if orientation is not None:
        ds.PatientOrientation = orientation
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype(np.uint8).tobytes()
    return ds


def test_mammo_model_sees_chest_wall_left_and_heatmap_comes_back(samples: Path) -> None:
    """Both CBIS-DDSM samples (a left CC hung chest wall left, a right CC hung chest wall right)
    reach the model with the breast on the left, and their heatmaps come back un-flipped: the
    double's heatmap is its input's brightness, so un-flipped it is the image as received."""
    for name, flipped in (("cbis-ddsm_P_00173_LEFT_CC_benign.dcm", False),
                          ("cbis-ddsm_P_00820_RIGHT_CC_malignant.dcm", True)):
        ds = pydicom.dcmread(samples / "MG" / name)
        model = BrightnessModel()
        analysis = mammo.analyse_instance(ds, model)
        [given] = model.inputs
        half = given.shape[1] // 2
        assert given[:, :half].mean() > 2 * given[:, half:].mean(), name
        assert analysis.details["flipped_left_right"] is flipped
        assert analysis.image.shape == (ds.Rows, ds.Columns, 3)
        expected = analysis.image.mean(axis=2) / 255.0
        assert np.allclose(analysis.prediction.heatmap, expected, atol=1e-6)
        # the SC image is the display image as received (no flip)
        assert np.array_equal(analysis.image, image_from_dataset(ds))


def test_mammo_orientation_from_pixels_when_attributes_say_nothing() -> None:
    pixels = _mias("mdb003")  # a right MLO, chest wall on the right
    ds = _mg(pixels, "R", "MLO", None)
    del ds.ImageLaterality
    model = BrightnessModel()
    analysis = mammo.analyse_instance(ds, model)
    assert analysis.details["orientation_from"] == "pixels"
    assert analysis.details["flipped_left_right"] is True
    assert np.array_equal(model.inputs[0], image_from_dataset(ds)[:, ::-1])


def test_mammo_views_combine_per_breast_and_study_is_worst_breast() -> None:
    """Four views of one woman (mini-MIAS mdb001 right, mdb002 left, MLO; the CC slots hold
    the same images, mini-MIAS has no CC views): one group per breast with the mean of its
    views; the study finding is the more suspicious breast."""
    right, left = _mias("mdb001"), _mias("mdb002")
    views = [
        _mg(right, "R", "CC", ["P", "L"]),
        _mg(right, "R", "MLO", ["P", "F"]),
        _mg(left, "L", "CC", ["A", "R"]),
        _mg(left, "L", "MLO", ["A", "F"]),
    ]
    series = mammo.analyse_series(views, BrightnessModel())
    assert series.groups is not None
    # one group per breast, then the study's own over both (SR Finding Site right and left)
    assert [g.laterality for g in series.groups] == ["R", "L", "B"]
    assert [g.source_indices for g in series.groups] == [(0, 1), (2, 3), (0, 1, 2, 3)]
    for group in series.groups[:2]:
        members = [series.analyses[i].prediction for i in group.source_indices]
        for label in LABELS:
            mean = np.mean([p.probabilities[label] for p in members])
            assert group.prediction.probabilities[label] == pytest.approx(mean)
    worst = max(series.groups[:2], key=lambda g: g.prediction.probabilities["malignant"])
    assert series.series_prediction.probabilities == worst.prediction.probabilities
    assert series.groups[2].prediction is series.series_prediction
    assert [d["views"] for d in series.group_details] == [["CC", "MLO"], ["CC", "MLO"],
                                                          ["CC", "MLO", "CC", "MLO"]]
    assert [d["scope"] for d in series.group_details] == ["breast", "breast", "study"]

    # one breast only: its group is the study finding, no separate study group
    single = mammo.analyse_series(views[:2], BrightnessModel())
    assert single.groups is not None and [g.laterality for g in single.groups] == ["R"]


def test_ultrasound_multiframe_picks_the_most_suspicious_sampled_frame(
    samples: Path, us_model: Classifier
) -> None:
    ds = pydicom.dcmread(samples / "US/examples_ybr_color_multiframe.dcm")
    analysis = ultrasound.analyse_instance(ds, us_model, max_frames=4)
    assert analysis.details["frames"] == 30
    assert analysis.details["frames_analysed"] == [1, 11, 20, 30]
    assert analysis.details["region"] is None  # its regions lie outside its frames
    one_by_one = {
        n: us_model.predict(image_from_dataset(ds, n - 1))
        for n in analysis.details["frames_analysed"]
    }
    best = max(one_by_one, key=lambda n: suspicion(one_by_one[n].probabilities) or 0.0)
    assert analysis.frame_number == best
    assert np.array_equal(analysis.image, image_from_dataset(ds, best - 1))
    for label in us_model.labels:
        mean = np.mean([p.probabilities[label] for p in one_by_one.values()])
        assert analysis.prediction.probabilities[label] == pytest.approx(mean, abs=1e-4)
    assert np.allclose(analysis.prediction.heatmap, one_by_one[best].heatmap, atol=1e-4)


def test_ultrasound_region_crop_keeps_text_and_scale_from_the_model(
    samples: Path, us_model: Classifier
) -> None:
    ds = pydicom.dcmread(samples / "US/OBXXXX1A_rle_2frame.dcm")
    region = ultrasound_region(ds)
    assert region is not None
    top, left, bottom, right = region
    analysis = ultrasound.analyse_instance(ds, us_model, max_frames=16)
    assert analysis.details["frames_analysed"] == [1, 2]
    assert analysis.frame_number in (1, 2)
    heatmap = analysis.prediction.heatmap
    assert heatmap.shape == (600, 800)
    outside = heatmap.copy()
    outside[top:bottom, left:right] = 0
    assert not outside.any()  # nothing outside the tissue region
    assert analysis.frame_number is not None
    frame = image_from_dataset(ds, analysis.frame_number - 1)
    direct = us_model.predict(frame[top:bottom, left:right])
    assert analysis.details["frame_probabilities"] == pytest.approx(direct.probabilities,
                                                                    abs=1e-4)
    assert np.allclose(heatmap[top:bottom, left:right], direct.heatmap, atol=1e-4)


def test_single_frame_us_without_region_is_the_plain_prediction(
    samples: Path, us_model: Classifier
) -> None:
    ds = pydicom.dcmread(samples / "US/US1_UNCR.dcm")
    analysis = analyse_instance(ds, us_model, us_max_frames=16)
    direct = us_model.predict(image_from_dataset(ds))
    assert analysis.frame_number is None
    assert analysis.prediction.probabilities == pytest.approx(direct.probabilities, abs=1e-6)


def test_an_instance_without_pixels_is_refused_with_the_reason(us_model: Classifier) -> None:
    ds = Dataset()
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "US"
    with pytest.raises(PipelineError, match="no pixel data"):
        ultrasound.analyse_instance(ds, us_model, max_frames=4)


@pytest.mark.parametrize("which", ["trained", "mg_recipe"])
def test_for_processing_twin_gets_the_same_result(
    us_model: Classifier, which: str, tmp_path: Path
) -> None:
    """A mini-MIAS film as For Presentation and as its For Processing twin (raw values linear
    in intensity, I = I0 exp(-3 density), 14 bits) get the same finding within 0.02. "trained":
    the bundled MG model when there is one; until then the bundled US network stands in as the
    real CNN that sees both (what is compared is what the pixel pipeline feeds any model).
    "mg_recipe": an untrained one-channel network with the MG recipe's breast crop, so the
    crop (found on each twin's own display pixels) is part of what must agree."""
    model: Classifier
    if which == "mg_recipe":
        model = load_bundled("MG", write_untrained_mg_model(tmp_path / "mg"))
    else:
        try:
            model = load_bundled("MG")
        except ModelNotAvailableError:
            model = us_model
    film = _mias("mdb001")
    presentation = _mg(film, "R", "MLO", ["P", "F"])
    raw = np.rint(16000.0 * np.exp(-3.0 * film.astype(np.float64) / 255.0)).astype(np.uint16)
    processing = _mg(film, "R", "MLO", ["P", "F"])
    processing.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2.1"
    processing.PresentationIntentType = "FOR PROCESSING"
    processing.PixelIntensityRelationship = "LIN"
    processing.PixelIntensityRelationshipSign = 1
    processing.PhotometricInterpretation = "MONOCHROME1"
    processing.BitsAllocated = 16
    processing.BitsStored = 14
    processing.HighBit = 13
    processing.PixelData = raw.astype("<u2").tobytes()
    a = mammo.analyse_instance(presentation, model).prediction
    b = mammo.analyse_instance(processing, model).prediction
    for label in model.labels:
        assert abs(a.probabilities[label] - b.probabilities[label]) < 0.02, (label, a, b)
    assert float(np.abs(a.heatmap - b.heatmap).mean()) < 0.05


def test_large_mammogram_is_analysed_and_shown_scaled_down(samples: Path) -> None:
    ds = pydicom.dcmread(samples / "MG/cbis-ddsm_P_00820_RIGHT_CC_malignant.dcm")  # 4688x2592
    model = BrightnessModel()
    analysis = mammo.analyse_instance(ds, model, max_side=1024)
    assert analysis.image.shape == (1024, 566, 3)
    assert model.inputs[0].shape == (1024, 566, 3)
    assert analysis.prediction.heatmap.shape == (1024, 566)
    assert analysis.details["analysed_size"] == [1024, 566]
    results = build_results([ds], [analysis.image], [analysis.prediction],
                            series_prediction=analysis.prediction, software_version="test")
    sc = results.heatmaps[0]
    assert (sc.Rows, sc.Columns) == (1024, 566)
    assert "PixelSpacing" not in sc  # the source's spacing does not hold for the scaled image
    with pytest.raises(ValueError, match="Rows x Columns"):
        squashed = np.ascontiguousarray(analysis.image[:, :400])
        build_results([ds], [squashed], [replace(analysis.prediction,
                                                 heatmap=analysis.prediction.heatmap[:, :400])],
                      series_prediction=analysis.prediction, software_version="test")
