"""Wrap BUSI breast-ultrasound PNGs as real Ultrasound Image Storage instances.

The BUSI copy in shared data is 256x256 RGB PNG. 648 of the 661 images have three equal
channels (a grey B-mode image stored as RGB); the others carry colour (Doppler or coloured
marks). ``photometric="auto"`` (the default) writes equal-channel images as MONOCHROME2
(lossless, and what a B-mode scanner sends) and the rest as RGB, PlanarConfiguration 0.

Each instance has the modules of the US Image IOD that a scanner fills: Patient, General Study,
General Series (Modality US, BodyPartExamined BREAST, Laterality), General Equipment, General
Acquisition, General Image, Image Pixel, US Image, SOP Common; Explicit VR Little Endian. US
Region Calibration is left out: the resized BUSI images have no known physical spacing. The
pixels were resized by the BUSI copy's curators, so ImageType is DERIVED\\PRIMARY and
DerivationDescription says so. ``dciodvfy`` reports no errors on these files (checked in
tests/test_support_selftest.py).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from dicom_node.store import InstanceKey, InstanceStore, StoreOutcome

US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"

Photometric = Literal["auto", "RGB", "MONOCHROME2"]
Laterality = Literal["L", "R", ""]


def _default_accession(study_instance_uid: str) -> str:
    digest = hashlib.sha256(study_instance_uid.encode()).hexdigest()
    return "BC" + str(int(digest[:12], 16))[:14]  # SH: at most 16 characters


def _pixels(png_path: Path, photometric: Photometric) -> tuple[np.ndarray, str]:
    with Image.open(png_path) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    grey = bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
    if photometric == "auto":
        photometric = "MONOCHROME2" if grey else "RGB"
    if photometric == "MONOCHROME2":
        if not grey:
            raise ValueError(
                f"{png_path}: channels differ, cannot store as MONOCHROME2 without loss; "
                "use photometric='RGB' or 'auto'"
            )
        return np.ascontiguousarray(rgb[..., 0]), "MONOCHROME2"
    return np.ascontiguousarray(rgb), "RGB"


def busi_as_ultrasound(
    png_path: str | Path,
    *,
    patient_id: str,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    accession_number: str | None = None,
    instance_number: int = 1,
    series_number: int = 1,
    patient_name: str | None = None,
    laterality: Laterality = "",
    photometric: Photometric = "auto",
    study_datetime: dt.datetime | None = None,
    manufacturer: str = "breastcad test factory",
) -> Dataset:
    """One BUSI PNG as an Ultrasound Image Storage dataset (with file meta, ready to save).

    UIDs not given are generated (random). ``accession_number`` defaults to one derived from
    the StudyInstanceUID, so every image of a study shares it. ``laterality`` is ``""``
    (unknown: BUSI does not record the side; dciodvfy then warns, it does not error) or
    ``"L"``/``"R"``. ``study_datetime`` defaults to now (local time, no timezone).
    """
    png_path = Path(png_path)
    pixels, photometric_interpretation = _pixels(png_path, photometric)
    study_instance_uid = study_instance_uid or generate_uid()
    series_instance_uid = series_instance_uid or generate_uid()
    sop_instance_uid = sop_instance_uid or generate_uid()
    if accession_number is None:
        accession_number = _default_accession(study_instance_uid)
    when = study_datetime or dt.datetime.now().replace(microsecond=0)
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")

    ds = Dataset()
    # SOP Common
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = US_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    # Patient
    ds.PatientName = patient_name if patient_name is not None else f"BUSI^{patient_id}"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "F"
    # General Study
    ds.StudyInstanceUID = study_instance_uid
    ds.StudyDate = date
    ds.StudyTime = time
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = accession_number
    ds.StudyDescription = "US BREAST"
    # General Series
    ds.Modality = "US"
    ds.SeriesInstanceUID = series_instance_uid
    ds.SeriesNumber = series_number
    ds.SeriesDate = date
    ds.SeriesTime = time
    ds.SeriesDescription = "Breast ultrasound (BUSI)"
    ds.BodyPartExamined = "BREAST"
    ds.Laterality = laterality
    # General Equipment
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = "BUSI PNG wrapper"
    ds.SoftwareVersions = "1"
    # General Acquisition
    ds.AcquisitionDate = date
    ds.AcquisitionTime = time
    # General Image
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = ""
    ds.ContentDate = date
    ds.ContentTime = time
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.DerivationDescription = "BUSI image, resized to 256x256 by the dataset copy's curators"
    # Image Pixel + US Image
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.PhotometricInterpretation = photometric_interpretation
    ds.SamplesPerPixel = 3 if photometric_interpretation == "RGB" else 1
    if photometric_interpretation == "RGB":
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OB"

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "BREASTCAD_TEST"
    ds.file_meta = meta
    return ds


def tiny_image(study: str, series: str, sop_class: str, modality: str,
               **attributes: object) -> Dataset:
    """An 8 x 8 MONOCHROME2 image of ``sop_class`` (zeros, Explicit VR LE, new SOP UID) in the
    given study and series, with ``attributes`` set by keyword: for store/dispatch tests that
    need instances, not pixels."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.Modality = modality
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.zeros((8, 8), np.uint8).tobytes()
    return ds


def store_dataset(store: InstanceStore, ds: Dataset, calling_ae: str = "TEST") -> StoreOutcome:
    """Store ``ds`` through ``store`` as the listener does: its key and Part 10 bytes."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    key = InstanceKey(
        sop_class_uid=str(ds.SOPClassUID), sop_instance_uid=str(ds.SOPInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
    )
    return store.store(key, buffer.getvalue(), ds, calling_ae)


def write_dataset(ds: Dataset, path: str | Path) -> Path:
    """Write ``ds`` as a DICOM Part 10 file (preamble, DICM, file meta); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", Dataset()):
        raise ValueError("dataset has no file_meta.TransferSyntaxUID; cannot write Part 10")
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


def make_us_series(
    pngs: Sequence[str | Path],
    tmpdir: str | Path,
    *,
    patient_id: str = "BUSI-0001",
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    accession_number: str | None = None,
    laterality: Laterality = "",
    photometric: Photometric = "auto",
) -> list[Path]:
    """Write one US series (one study, instance numbers 1..n) from BUSI PNGs into ``tmpdir``.

    Files are named ``US_0001.dcm``... in the order of ``pngs``; returns their paths.
    """
    if not pngs:
        raise ValueError("make_us_series: no PNGs given")
    study_instance_uid = study_instance_uid or generate_uid()
    series_instance_uid = series_instance_uid or generate_uid()
    if accession_number is None:
        accession_number = _default_accession(study_instance_uid)
    when = dt.datetime.now().replace(microsecond=0)
    out = Path(tmpdir)
    paths: list[Path] = []
    for number, png in enumerate(pngs, start=1):
        ds = busi_as_ultrasound(
            png,
            patient_id=patient_id,
            study_instance_uid=study_instance_uid,
            series_instance_uid=series_instance_uid,
            accession_number=accession_number,
            instance_number=number,
            laterality=laterality,
            photometric=photometric,
            study_datetime=when,
        )
        paths.append(write_dataset(ds, out / f"US_{number:04d}.dcm"))
    return paths


# -- mammography (mini-MIAS) ---------------------------------------------------------------------

MG_PRESENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.1.2"
MG_PROCESSING_STORAGE = "1.2.840.10008.5.1.4.1.1.1.2.1"
# PatientOrientation of each view as hung in a reading room (PS3.3 C.8.11.7 examples)
MG_ORIENTATION: dict[tuple[str, str], list[str]] = {
    ("L", "CC"): ["A", "R"],
    ("R", "CC"): ["P", "L"],
    ("L", "MLO"): ["A", "F"],
    ("R", "MLO"): ["P", "F"],
}
_VIEW_CODE = {
    "CC": ("399162004", "cranio-caudal"),
    "MLO": ("399368009", "medio-lateral oblique"),
}


def mias_as_mammogram(
    png_path: str | Path,
    *,
    side: Literal["L", "R"],
    view: Literal["CC", "MLO"],
    patient_id: str,
    study_instance_uid: str,
    series_instance_uid: str,
    instance_number: int = 1,
    patient_name: str | None = None,
    specific_character_set: str = "ISO_IR 100",
    flip_left_right: bool = False,
) -> Dataset:
    """A mini-MIAS PNG as Digital Mammography X-Ray Image Storage - For Presentation.

    mini-MIAS images are 1024x1024, 8-bit, 200 micron pixels, hung as read (a right breast with
    its chest wall on the right). The values are stored 12-bit (x16) with a window over the whole
    range; ImageLaterality, ViewPosition, ViewCodeSequence and PatientOrientation (as hung,
    :data:`MG_ORIENTATION`) say which breast and view it is. ``flip_left_right`` mirrors the
    pixels (to hang an image of one side as the other).
    """
    with Image.open(png_path) as im:
        gray = np.asarray(im.convert("L"), dtype=np.uint16)
    if flip_left_right:
        gray = gray[:, ::-1]
    pixels = np.ascontiguousarray(gray * 16)
    when = dt.datetime.now().replace(microsecond=0)
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    ds = Dataset()
    ds.SpecificCharacterSet = specific_character_set
    ds.SOPClassUID = MG_PRESENTATION_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    ds.PatientName = patient_name if patient_name is not None else f"MIAS^{patient_id}"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "F"
    ds.StudyInstanceUID = study_instance_uid
    ds.StudyDate = date
    ds.StudyTime = time
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = _default_accession(study_instance_uid)
    ds.StudyDescription = "MAMMOGRAPHY SCREENING"
    ds.Modality = "MG"
    ds.SeriesInstanceUID = series_instance_uid
    ds.SeriesNumber = 1
    ds.SeriesDescription = "mini-MIAS screening views"
    ds.BodyPartExamined = "BREAST"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = "breastcad test factory"
    ds.ManufacturerModelName = "mini-MIAS PNG wrapper"
    ds.SoftwareVersions = "1"
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = MG_ORIENTATION[(side, view)]
    ds.ContentDate = date
    ds.ContentTime = time
    ds.AcquisitionDate = date
    ds.AcquisitionTime = time
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.DerivationDescription = "digitised screen-film mammogram (mini-MIAS)"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.ImageLaterality = side
    # what Hologic and others write (dciodvfy warns: MLO/CC are not DX's defined terms)
    ds.ViewPosition = view
    code, meaning = _VIEW_CODE[view]
    view_code = Dataset()
    view_code.CodeValue = code
    view_code.CodingSchemeDesignator = "SCT"
    view_code.CodeMeaning = meaning
    view_code.ViewModifierCodeSequence = []
    ds.ViewCodeSequence = [view_code]
    region = Dataset()
    region.CodeValue = "76752008"
    region.CodingSchemeDesignator = "SCT"
    region.CodeMeaning = "Breast"
    ds.AnatomicRegionSequence = [region]
    ds.AcquisitionContextSequence = []
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.OrganExposed = "BREAST"
    ds.ImagerPixelSpacing = [0.2, 0.2]
    ds.PixelSpacing = [0.2, 0.2]
    ds.DetectorType = "FILM"
    ds.KVP = ""
    ds.ExposureTime = ""
    ds.XRayTubeCurrent = ""
    ds.Exposure = ""
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = -1
    ds.PresentationLUTShape = "IDENTITY"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "BREASTCAD_TEST"
    ds.file_meta = meta
    return ds
