"""Fixtures for the reports tests: synthetic sources and predictions, sample decoding.

``Prediction`` objects are built directly with chosen probabilities and a synthetic heatmap:
``reports`` is a library of object builders, and these tests check what it builds from them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.pixels import apply_color_lut
from pydicom.uid import ExplicitVRLittleEndian, UltrasoundImageStorage

from inference.prediction import Prediction

BUSI_LABELS = ("normal", "benign", "malignant")
MODEL_SHA256 = "0123456789abcdef" * 4

MakePrediction = Callable[..., Prediction]
MakeSource = Callable[..., Dataset]


def _hot_spot(rows: int, columns: int, centre: tuple[float, float] | None = None,
             radius: float | None = None) -> np.ndarray:
    """A float32 Gaussian heatmap in [0, 1] peaking at ``centre`` (row, column)."""
    cy, cx = centre if centre is not None else (rows * 0.6, columns * 0.6)
    r = radius if radius is not None else max(2.0, min(rows, columns) / 8)
    yy, xx = np.mgrid[0:rows, 0:columns].astype(np.float32)
    return np.exp(-(((yy - cy) / r) ** 2 + ((xx - cx) / r) ** 2)).astype(np.float32)


@pytest.fixture
def make_prediction() -> MakePrediction:
    """A factory: ``make_prediction(rows, columns, label=..., labels=..., probabilities=...)``."""

    def factory(
        rows: int,
        columns: int,
        *,
        label: str = "malignant",
        labels: tuple[str, ...] = BUSI_LABELS,
        probabilities: dict[str, float] | None = None,
        model_name: str = "busi_cnn",
        model_version: str = "1.0.0",
        model_sha256: str = MODEL_SHA256,
        heatmap: np.ndarray | None = None,
        modality: str = "US",
        ood_score: float | None = None,
        not_assessable: bool = False,
    ) -> Prediction:
        if probabilities is None:
            rest = (1.0 - 0.7) / max(1, len(labels) - 1)
            probabilities = {name: (0.7 if name == label else rest) for name in labels}
        return Prediction(
            modality=modality,
            label=label,
            labels=labels,
            probabilities=probabilities,
            model_name=model_name,
            model_version=model_version,
            model_sha256=model_sha256,
            heatmap=_hot_spot(rows, columns) if heatmap is None else heatmap,
            embedding=np.zeros(8, dtype=np.float32),
            ood_score=ood_score,
            not_assessable=not_assessable,
        )

    return factory


@pytest.fixture
def make_source() -> MakeSource:
    """A factory of small synthetic US Image Storage sources (RGB pixels), no shared data."""

    def factory(
        instance: int = 1,
        *,
        rows: int = 96,
        columns: int = 128,
        series_uid: str = "1.2.826.0.1.3680043.8.498.1.2",
        study_uid: str = "1.2.826.0.1.3680043.8.498.1.1",
        modality: str = "US",
        laterality: str | None = None,
    ) -> Dataset:
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = UltrasoundImageStorage
        ds.SOPClassUID = UltrasoundImageStorage
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.1.3.{instance}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.Modality = modality
        ds.PatientName = "Doe^Jane"
        ds.PatientID = "P-0001"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "F"
        ds.StudyID = "S1"
        ds.AccessionNumber = "A-77"
        ds.StudyDate = "20260101"
        ds.StudyTime = "101010"
        ds.ReferringPhysicianName = "Who^Doctor"
        ds.SeriesNumber = 3
        ds.InstanceNumber = instance
        if laterality is not None:
            ds.ImageLaterality = laterality
        ds.Rows = rows
        ds.Columns = columns
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        ds.BitsAllocated = 8
        ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        rng = np.random.default_rng(instance)
        ds.PixelData = rng.integers(0, 256, (rows, columns, 3), dtype=np.uint8).tobytes()
        return ds

    return factory


def _display_image(ds: Dataset) -> np.ndarray:
    """The uint8 RGB display image of a sample (first frame; palette applied; grey stacked)."""
    pixels = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[0]
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
        if pixels.dtype != np.uint8:
            pixels = (pixels >> 8).astype(np.uint8)
    if pixels.ndim == 2:
        grey = pixels.astype(np.float32)
        low, high = float(grey.min()), float(grey.max())
        grey = np.rint(255.0 * (grey - low) / max(1.0, high - low)).astype(np.uint8)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            grey = 255 - grey
        pixels = np.stack([grey] * 3, axis=-1)
    return np.ascontiguousarray(pixels, dtype=np.uint8)


@pytest.fixture
def display_image() -> Callable[[Dataset], np.ndarray]:
    """Decode a sample's display image like the worker does (first frame, uint8 RGB)."""
    return _display_image


@pytest.fixture
def hot_spot() -> Callable[..., np.ndarray]:
    """``hot_spot(rows, columns, centre=(row, column), radius=r)``: a Gaussian heatmap."""
    return _hot_spot


@pytest.fixture(scope="session")
def samples_dir(shared_data: Path) -> Path:
    """The DICOM samples folder of the shared data; skips when it is missing."""
    path = shared_data / "dicom-samples"
    if not path.is_dir():
        pytest.skip(f"no dicom-samples folder in the shared data ({path})")
    return path


@pytest.fixture
def read_sample(samples_dir: Path) -> Callable[[str], Dataset]:
    """``read_sample("US/US1_UNCR.dcm")``; skips when that file is missing."""

    def read(relative: str) -> Dataset:
        path = samples_dir / relative
        if not path.is_file():
            pytest.skip(f"sample {relative} is not in {samples_dir}")
        return pydicom.dcmread(path)

    return read
