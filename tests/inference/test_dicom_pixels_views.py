"""Where an image is and how it is oriented: laterality, view, mammography flips, the US tissue
region, frame sampling, and For Processing mammograms shown like their For Presentation twin."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from inference import image_from_dataset
from inference.dicom_pixels import (
    frame_indices,
    image_laterality,
    mammo_flips,
    ultrasound_region,
    view_position,
)

MG_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
MG_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"


def _attrs(**values: object) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def test_laterality_prefers_image_laterality() -> None:
    assert image_laterality(_attrs(ImageLaterality="R", Laterality="L")) == "R"
    assert image_laterality(_attrs(Laterality="L")) == "L"
    assert image_laterality(_attrs(ImageLaterality="B")) is None
    assert image_laterality(Dataset()) is None


def test_view_from_view_position_code_or_cbis_orientation(dicom_samples: Path) -> None:
    assert view_position(_attrs(ViewPosition="MLO")) == "MLO"
    code = _attrs(CodeValue="399162004", CodingSchemeDesignator="SCT", CodeMeaning="cc")
    assert view_position(_attrs(ViewPosition="", ViewCodeSequence=[code])) == "CC"
    cbis = pydicom.dcmread(
        dicom_samples / "MG/cbis-ddsm_P_00173_LEFT_CC_benign.dcm", stop_before_pixels=True
    )
    assert (image_laterality(cbis), view_position(cbis)) == ("L", "CC")
    assert view_position(_attrs(PatientOrientation=["A", "FR"])) is None


@pytest.mark.parametrize(
    ("side", "orientation", "expected"),
    [
        ("L", ["A", "R"], (False, False)),  # left CC as hung: chest wall left, lateral up
        ("R", ["P", "L"], (True, False)),  # right CC as hung: chest wall right
        ("L", ["A", "F"], (False, False)),  # left MLO
        ("R", ["P", "F"], (True, False)),  # right MLO
        ("R", ["P", "FL"], (True, False)),  # oblique column direction
        ("L", ["A", "L"], (False, True)),  # left CC with the lateral side down
        ("L", ["P", "H"], (True, True)),  # rotated 180 degrees
        ("R", None, (True, False)),  # no orientation: a right breast is hung chest wall right
        ("L", None, (False, False)),
        ("R", "CC", (True, False)),  # CBIS-DDSM: PatientOrientation holds the view
    ],
)
def test_mammo_flips(side: str, orientation: object, expected: tuple[bool, bool]) -> None:
    ds = _attrs(ImageLaterality=side)
    if orientation is not None:
        ds.PatientOrientation = orientation
    assert mammo_flips(ds) == expected


def test_mammo_flips_unknown_without_side_or_orientation() -> None:
    assert mammo_flips(Dataset()) is None


def test_flip_puts_the_chest_wall_of_both_cbis_samples_on_the_left(dicom_samples: Path) -> None:
    """The CBIS-DDSM right CC is hung chest wall right, the left CC chest wall left; after the
    flips both have their tissue (the bright side) on the left."""
    for name in (
        "cbis-ddsm_P_00173_LEFT_CC_benign.dcm",
        "cbis-ddsm_P_00820_RIGHT_CC_malignant.dcm",
    ):
        ds = pydicom.dcmread(dicom_samples / "MG" / name)
        image = image_from_dataset(ds)[::8, ::8, 0].astype(float)
        flips = mammo_flips(ds)
        assert flips is not None
        if flips[0]:
            image = image[:, ::-1]
        half = image.shape[1] // 2
        assert image[:, :half].mean() > 2 * image[:, half:].mean(), name


def test_ultrasound_regions_of_the_samples(dicom_samples: Path) -> None:
    def region(name: str) -> tuple[int, int, int, int] | None:
        return ultrasound_region(pydicom.dcmread(dicom_samples / "US" / name,
                                                 stop_before_pixels=True))

    # the 2D tissue region, not the spectral strip below it; MaxX1 = Columns (one past the
    # last column) is clipped
    assert region("OBXXXX1A_rle_2frame.dcm") == (60, 120, 519, 800)
    # the same region in a copy cut short at row 350: clipped (63 % of it is inside)
    assert region("examples_palette.dcm") == (60, 120, 350, 800)
    assert region("deid_GREYSCALE_IMAGE.dcm") == (38, 14, 759, 1011)
    # this file's region (x 84..595, y 31..414) lies mostly outside its 320x240 frames (a
    # downscaled copy): ignored
    assert region("examples_ybr_color_multiframe.dcm") is None
    assert region("US1_UNCR.dcm") is None  # no SequenceOfUltrasoundRegions


def test_ultrasound_region_prefers_tissue_and_the_largest() -> None:
    def item(x0: int, y0: int, x1: int, y1: int, kind: int, fmt: int = 1) -> Dataset:
        return _attrs(RegionSpatialFormat=fmt, RegionDataType=kind, RegionLocationMinX0=x0,
                      RegionLocationMinY0=y0, RegionLocationMaxX1=x1, RegionLocationMaxY1=y1)

    ds = _attrs(Rows=400, Columns=600, SequenceOfUltrasoundRegions=[
        item(0, 0, 299, 399, 2),  # larger, but colour-flow data
        item(300, 10, 549, 209, 1),  # tissue
        item(310, 220, 599, 399, 1),  # tissue, larger
        item(0, 0, 599, 399, 1, fmt=3),  # spectral: not 2D
        item(5, 5, 10, 10, 1),  # too small
    ])
    assert ultrasound_region(ds) == (220, 310, 400, 600)


def test_frame_indices() -> None:
    assert frame_indices(2, 16) == [0, 1]
    assert frame_indices(30, 4) == [0, 10, 19, 29]
    assert frame_indices(30, 1) == [0]
    assert len(frame_indices(1000, 16)) == 16
    assert frame_indices(0, 16) == []
    with pytest.raises(ValueError, match="positive"):
        frame_indices(5, 0)


def _mg(pixels: np.ndarray, **values: object) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 14
    ds.HighBit = 13
    ds.PixelRepresentation = 0
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    return ds


def _for_processing_twin(display: np.ndarray, photometric: str, sign: int) -> Dataset:
    """Raw detector values of a display image: intensity falls exponentially with the density
    shown (I = I0 exp(-3 d)), 14 bits, linear in intensity."""
    density = display.astype(np.float64) / 255.0
    raw = np.rint(16000.0 * np.exp(-3.0 * density)).astype(np.uint16)
    if sign == -1:  # higher value, less intensity (14 bits stored)
        raw = (16383 - raw).astype(np.uint16)
    return _mg(raw, SOPClassUID=MG_PROCESSING, PresentationIntentType="FOR PROCESSING",
               PixelIntensityRelationship="LIN", PixelIntensityRelationshipSign=sign,
               PhotometricInterpretation=photometric)


def test_for_processing_twin_looks_like_its_presentation(shared_data: Path) -> None:
    """A real mammogram (mini-MIAS, 8-bit presentation values) and its For Processing twin (raw,
    linear in intensity) give the same display image up to the 14-bit quantisation of the raw
    values, whichever PixelIntensityRelationshipSign and photometric interpretation it has."""
    with Image.open(shared_data / "mini-mias/normal/mdb004.png") as im:
        display = np.asarray(im.convert("L"))[::4, ::4]
    presentation = image_from_dataset(_mg(
        display.astype(np.uint16), SOPClassUID=MG_PRESENTATION,
        PresentationIntentType="FOR PRESENTATION", BitsStored=8, HighBit=7,
    ))
    low, high = float(display.min()), float(display.max())
    stretched = np.rint((display - low) / (high - low) * 255.0)
    assert np.array_equal(presentation[..., 0], stretched)  # min-max stretch (no window)
    for photometric, sign in (("MONOCHROME1", 1), ("MONOCHROME2", 1), ("MONOCHROME2", -1)):
        twin = image_from_dataset(_for_processing_twin(display, photometric, sign))
        error = np.abs(twin[..., 0].astype(int) - presentation[..., 0].astype(int))
        # log of a 14-bit quantised exponential: worst near the brightest (densest) pixels
        assert error.mean() < 1.0 and error.max() <= 6, (photometric, sign, error.max())


def test_for_processing_without_relationship_falls_back_to_min_max() -> None:
    raw = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    ds = _mg(raw, PresentationIntentType="FOR PROCESSING", PhotometricInterpretation="MONOCHROME1")
    image = image_from_dataset(ds)[..., 0]
    assert image[0, 0] == 255 and image[-1, -1] == 0  # plain MONOCHROME1 inversion
