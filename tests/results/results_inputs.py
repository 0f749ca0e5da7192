"""Small synthetic inputs for the results tests: a US source dataset and predictions.

``reports`` and ``dicom_node.similar`` are libraries; these tests check what they build from
chosen inputs (the real model's outputs are exercised by the e2e tests).
"""

from __future__ import annotations

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, UltrasoundImageStorage

from inference.prediction import Prediction

LABELS = ("normal", "benign", "malignant")
SHA = "fedcba9876543210" * 4
STUDY = "1.2.826.0.1.3680043.8.498.55.1"
SERIES = "1.2.826.0.1.3680043.8.498.55.2"


def us_source(instance: int = 1, *, rows: int = 64, columns: int = 80,
              study_uid: str = STUDY, series_uid: str = SERIES) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UltrasoundImageStorage
    ds.SOPClassUID = UltrasoundImageStorage
    ds.SOPInstanceUID = f"{series_uid}.{instance}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "US"
    ds.PatientName = "Test^Results"
    ds.PatientID = "RES-1"
    ds.PatientBirthDate = "19800101"
    ds.PatientSex = "F"
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC-RES-1"
    ds.StudyDate = "20260102"
    ds.StudyTime = "080000"
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber = 2
    ds.InstanceNumber = instance
    ds.ImageLaterality = "L"
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


def prediction(rows: int = 64, columns: int = 80, *, label: str = "malignant",
               probabilities: dict[str, float] | None = None,
               embedding: np.ndarray | None = None) -> Prediction:
    if probabilities is None:
        probabilities = {name: (0.8 if name == label else 0.1) for name in LABELS}
    yy, xx = np.mgrid[0:rows, 0:columns].astype(np.float32)
    heatmap = np.exp(-(((yy - rows / 2) / 10) ** 2 + ((xx - columns / 2) / 10) ** 2))
    return Prediction(
        modality="US",
        label=label,
        labels=LABELS,
        probabilities=probabilities,
        model_name="busi_test",
        model_version="9.9.9",
        model_sha256=SHA,
        heatmap=heatmap.astype(np.float32),
        embedding=(np.ones(16, dtype=np.float32) if embedding is None else embedding),
    )


def display_image(ds: Dataset) -> np.ndarray:
    return np.frombuffer(ds.PixelData, dtype=np.uint8).reshape(ds.Rows, ds.Columns, 3).copy()

