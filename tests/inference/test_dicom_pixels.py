"""Display pixels from every US, MG and SM sample, and the error cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset

from inference import image_from_dataset, image_from_file, number_of_frames

# file -> (rows, columns, frames); what SOURCE.md of the samples lists.
SAMPLES: dict[str, tuple[int, int, int]] = {
    "US/US1_UNCR.dcm": (480, 640, 1),  # RGB, native
    "US/OBXXXX1A_rle_2frame.dcm": (600, 800, 2),  # PALETTE COLOR, RLE
    "US/examples_ybr_color_multiframe.dcm": (240, 320, 30),  # YBR_FULL_422, JPEG baseline
    "US/examples_palette.dcm": (350, 800, 1),  # PALETTE COLOR, native
    "US/deid_GREYSCALE_IMAGE.dcm": (768, 1024, 1),  # MONOCHROME2 with window
    "MG/MG_Explicit_Little_dclunie_testpattern.dcm": (512, 512, 1),  # MONOCHROME2, window
    "MG/cbis-ddsm_P_00173_LEFT_CC_benign.dcm": (4432, 2864, 1),  # 16-bit, RLE
    "MG/cbis-ddsm_P_00820_RIGHT_CC_malignant.dcm": (4688, 2592, 1),  # 16-bit, RLE
    "SM/sm_image.dcm": (10, 10, 25),  # RGB tiles
    "SM/sm_image_grayscale.dcm": (10, 10, 25),  # 16-bit grayscale tiles
    "SM/sm_image_jpegls.dcm": (10, 10, 25),  # JPEG-LS
    "SM/seg_image_sm_control.dcm": (10, 10, 20),  # 1-bit segmentation
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_sample_gives_uint8_rgb(dicom_samples: Path, name: str) -> None:
    rows, columns, frames = SAMPLES[name]
    ds = pydicom.dcmread(dicom_samples / name)
    assert number_of_frames(ds) == frames
    for frame in sorted({0, frames - 1}):
        image = image_from_dataset(ds, frame)
        assert image.dtype == np.uint8
        assert image.shape == (rows, columns, 3)
    if rows > 100:  # real images, not tiny test tiles: some contrast must survive
        assert int(image.max()) - int(image.min()) > 100


def test_every_image_file_in_the_sample_folders_is_covered(dicom_samples: Path) -> None:
    on_disk = {
        str(path.relative_to(dicom_samples))
        for folder in ("US", "MG", "SM")
        for path in (dicom_samples / folder).glob("*.dcm")
    }
    assert on_disk - set(SAMPLES) <= {"SM/sm_annotations.dcm"}


def test_ybr_is_converted_to_rgb_like_pydicom(dicom_samples: Path) -> None:
    ds = pydicom.dcmread(dicom_samples / "US/examples_ybr_color_multiframe.dcm")
    assert ds.PhotometricInterpretation == "YBR_FULL_422"
    reference = ds.pixel_array[5]  # pydicom converts YBR to RGB by default
    assert np.array_equal(image_from_dataset(ds, 5), reference)


def test_palette_is_looked_up(dicom_samples: Path) -> None:
    ds = pydicom.dcmread(dicom_samples / "US/examples_palette.dcm")
    image = image_from_dataset(ds)
    # Palette images carry colour: the channels differ somewhere.
    assert not np.array_equal(image[..., 0], image[..., 2])


def test_window_center_width_applied(dicom_samples: Path) -> None:
    ds = pydicom.dcmread(dicom_samples / "US/deid_GREYSCALE_IMAGE.dcm")
    stored = ds.pixel_array
    ds.WindowCenter, ds.WindowWidth = [100, 50], [21, 10]  # the first pair applies
    narrow = image_from_dataset(ds)[..., 0]
    assert np.all(narrow[stored <= 89] == 0)
    assert np.all(narrow[stored >= 110] == 255)
    middle = (stored > 90) & (stored < 109)
    assert middle.any() and np.all((narrow[middle] > 0) & (narrow[middle] < 255))
    expected = np.clip(((stored - 99.5) / 20 + 0.5) * 255, 0, 255)
    assert np.max(np.abs(narrow - expected)) <= 0.5 + 1e-9


def test_monochrome1_is_inverted(dicom_samples: Path) -> None:
    ds = pydicom.dcmread(dicom_samples / "MG/MG_Explicit_Little_dclunie_testpattern.dcm")
    normal = image_from_dataset(ds).astype(np.int32)
    ds.PhotometricInterpretation = "MONOCHROME1"
    inverted = image_from_dataset(ds).astype(np.int32)
    assert np.all(np.abs(normal + inverted - 255) <= 1)


def test_no_window_means_min_max(dicom_samples: Path) -> None:
    ds = pydicom.dcmread(dicom_samples / "MG/cbis-ddsm_P_00173_LEFT_CC_benign.dcm")
    assert "WindowCenter" not in ds
    image = image_from_dataset(ds)
    assert image.min() == 0 and image.max() == 255


def test_dataset_without_pixel_data_raises(dicom_samples: Path) -> None:
    ds = pydicom.dcmread(dicom_samples / "SM/sm_annotations.dcm")
    assert number_of_frames(ds) == 0
    with pytest.raises(ValueError, match="no pixel data"):
        image_from_dataset(ds)
    with pytest.raises(ValueError, match="no pixel data"):
        image_from_dataset(Dataset())


def test_frame_out_of_range_raises(dicom_samples: Path) -> None:
    ds = pydicom.dcmread(dicom_samples / "US/OBXXXX1A_rle_2frame.dcm")
    with pytest.raises(ValueError, match="out of range"):
        image_from_dataset(ds, 2)


def test_undecodable_pixel_data_raises(dicom_samples: Path) -> None:
    ds = pydicom.dcmread(dicom_samples / "US/OBXXXX1A_rle_2frame.dcm")
    ds.PixelData = b"\x00" * 64  # not a valid RLE encapsulation
    with pytest.raises(ValueError, match="cannot decode"):
        image_from_dataset(ds)


def test_image_from_file_png_and_dicom(tmp_path: Path, dicom_samples: Path) -> None:
    gray = np.arange(60 * 40, dtype=np.uint32).reshape(60, 40) % 256
    png = tmp_path / "gray.png"
    Image.fromarray(gray.astype(np.uint8)).save(png)
    image = image_from_file(png)
    assert image.shape == (60, 40, 3) and image.dtype == np.uint8
    assert np.array_equal(image[..., 1], gray.astype(np.uint8))
    dicom = image_from_file(dicom_samples / "US/US1_UNCR.dcm")
    assert dicom.shape == (480, 640, 3)


def test_image_from_file_unreadable(tmp_path: Path) -> None:
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image")
    with pytest.raises(ValueError):
        image_from_file(junk)
    with pytest.raises(ValueError):
        image_from_file(tmp_path / "missing.png")
    dcm = tmp_path / "junk.dcm"
    dcm.write_bytes(b"\x00" * 300)
    with pytest.raises(ValueError):
        image_from_file(dcm)
