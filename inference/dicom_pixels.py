"""Display pixels from DICOM datasets and ordinary image files.

``image_from_dataset`` turns one frame of any image IOD into uint8 RGB (H, W, 3) the way a viewer
shows it: decode (native, RLE, JPEG incl. YBR_FULL_422, JPEG-LS, JPEG 2000 through pydicom's pixel
handlers), then for grayscale the Modality LUT / rescale, the VOI LUT or the first Window
Center/Width (else a min-max stretch), MONOCHROME1 inverted; PALETTE COLOR through its lookup
tables; YBR converted to RGB. A For Processing X-ray image without VOI is shown from its
PixelIntensityRelationship (log of linear values, polarity from its sign).

Also here: what the attributes say about an image's place and orientation (``image_laterality``,
``view_position``, ``mammo_flips``), the tissue region of an ultrasound image
(``ultrasound_region``) and the frames to analyse of a multi-frame image (``frame_indices``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi_lut,
    convert_color_space,
)
from pydicom.uid import UID, ExplicitVRLittleEndian

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_DECODE_ERRORS = (
    AttributeError,
    KeyError,
    IndexError,
    NotImplementedError,
    OSError,
    RuntimeError,
    TypeError,
    ValueError,
)


def _has_pixels(ds: Dataset) -> bool:
    return any(keyword in ds for keyword in _PIXEL_KEYWORDS)


def number_of_frames(ds: Dataset) -> int:
    """Frames in the dataset's pixel data: NumberOfFrames (1 if absent), 0 without pixel data."""
    if not _has_pixels(ds):
        return 0
    value = ds.get("NumberOfFrames", 1)
    try:
        frames = int(value) if value not in (None, "") else 1
    except (TypeError, ValueError):
        frames = 1
    return max(frames, 1)


def _first(value: object) -> float:
    if isinstance(value, MultiValue | list | tuple):
        value = value[0]
    return float(value)  # type: ignore[arg-type]


def _stretch(values: np.ndarray) -> np.ndarray:
    """Min-max to 0..1 (a constant image becomes 0)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(values.shape, dtype=np.float64)
    low, high = float(finite.min()), float(finite.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.float64)
    return np.clip((np.nan_to_num(values, nan=low) - low) / (high - low), 0.0, 1.0)


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing to 0..1."""
    if function == "SIGMOID":
        return np.asarray(1.0 / (1.0 + np.exp(-4.0 * (values - center) / width)))
    if function == "LINEAR_EXACT":
        return np.clip((values - (center - width / 2.0)) / width, 0.0, 1.0)
    return np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def _for_processing_to_unit(values: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """A For Processing X-ray image without VOI -> 0..1 with dense tissue bright; None if the
    image is not one or does not say how its values relate to the beam intensity.

    Raw detector values linear in the X-ray intensity (PixelIntensityRelationship LIN) are taken
    to the log, reversed (attenuation is exponential in tissue thickness and density, so dense
    tissue gets little intensity); with PixelIntensityRelationshipSign -1 (higher value, less
    intensity) the intensity is 2^BitsStored - 1 - value. LOG values are reversed when the sign
    is +1. Then min-max to 0..1. This is what a viewer's
    default presentation of raw data would be, not the vendor's image processing (equalisation,
    unsharp masking), which For Processing images have not had.
    """
    intent = str(ds.get("PresentationIntentType") or "").strip().upper()
    relationship = str(ds.get("PixelIntensityRelationship") or "").strip().upper()
    sign = ds.get("PixelIntensityRelationshipSign")
    if intent != "FOR PROCESSING" or relationship not in ("LIN", "LOG") or sign in (None, ""):
        return None
    more_is_brighter_beam = int(sign) == 1
    if relationship == "LIN":
        if not more_is_brighter_beam:  # linear, falling: intensity is the distance to the top
            values = float(2 ** int(ds.get("BitsStored", 16) or 16) - 1) - values
        return _stretch(-np.log(np.maximum(values, 1.0)))
    return _stretch(-values if more_is_brighter_beam else values)


def _has_voi(ds: Dataset) -> bool:
    sequence = ds.get("VOILUTSequence")
    if sequence and np.asarray(sequence[0].get("LUTData", [])).size:
        return True
    return ds.get("WindowCenter") not in (None, "") and ds.get("WindowWidth") not in (None, "")


def _grayscale_to_unit(frame: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored grayscale values -> 0..1 display values (before any MONOCHROME1 inversion)."""
    values = np.asarray(apply_modality_lut(frame, ds), dtype=np.float64)
    voi_sequence = ds.get("VOILUTSequence")
    if voi_sequence:
        item = voi_sequence[0]
        lut_data = np.asarray(item.get("LUTData", []), dtype=np.float64).ravel()
        if lut_data.size:
            mapped = np.asarray(apply_voi_lut(values, ds, index=0, prefer_lut=True), np.float64)
            low, high = float(lut_data.min()), float(lut_data.max())
            if high > low:
                return np.asarray(np.clip((mapped - low) / (high - low), 0.0, 1.0))
            return _stretch(mapped)
    center_value = ds.get("WindowCenter")
    width_value = ds.get("WindowWidth")
    if center_value not in (None, "") and width_value not in (None, ""):
        center, width = _first(center_value), _first(width_value)
        raw_function = ds.get("VOILUTFunction", "LINEAR")
        function = str(_first_str(raw_function)).strip().upper() or "LINEAR"
        minimum_width = 0.0 if function in ("SIGMOID", "LINEAR_EXACT") else 1.0
        if np.isfinite(center) and np.isfinite(width) and width > minimum_width:
            return _window(values, center, width, function)
    return _stretch(values)


def _first_str(value: object) -> str:
    if isinstance(value, MultiValue | list | tuple):
        return str(value[0]) if len(value) else ""
    return str(value)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)


def _color_to_uint8(rgb: np.ndarray, bits: int) -> np.ndarray:
    """Integer RGB of ``bits`` bits per sample -> uint8."""
    if rgb.dtype == np.uint8:
        return rgb
    if np.issubdtype(rgb.dtype, np.floating):
        return _to_uint8(_stretch(rgb.astype(np.float64)))
    maximum = float(2 ** max(bits, 1) - 1)
    return _to_uint8(np.clip(rgb.astype(np.float64) / maximum, 0.0, 1.0))


def _palette_bits(ds: Dataset) -> int:
    descriptor = ds.get("RedPaletteColorLookupTableDescriptor")
    if descriptor is not None and len(descriptor) == 3:
        return int(descriptor[2])
    return 16


def image_from_dataset(ds: Dataset, frame: int = 0) -> np.ndarray:
    """One frame of ``ds`` as uint8 RGB display pixels, shape (Rows, Columns, 3).

    Raises ``ValueError`` if the dataset has no pixel data, ``frame`` is out of range, or the
    pixel data cannot be decoded (for example a missing decoder plugin or corrupt data).
    """
    if not _has_pixels(ds):
        raise ValueError("dataset has no pixel data (no PixelData element): not an image")
    frames = number_of_frames(ds)
    if not 0 <= frame < frames:
        raise ValueError(f"frame {frame} out of range: the dataset has {frames} frame(s)")
    file_meta = getattr(ds, "file_meta", None)
    syntax = UID(file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian)) if file_meta else None
    if syntax is None:
        syntax = UID(ExplicitVRLittleEndian)
    try:
        decoder = get_decoder(syntax)
        decoded, meta = decoder.as_array(ds, index=frame)
    except _DECODE_ERRORS as exc:
        name = getattr(syntax, "name", str(syntax))
        raise ValueError(f"cannot decode pixel data ({name}): {exc}") from exc

    photometric = str(meta.get("photometric_interpretation", "")).strip().upper()
    if not photometric:
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    array = np.asarray(decoded)
    if array.ndim == 3 and array.shape[0] == 1 and array.shape[-1] not in (3, 4):
        array = array[0]
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)) or 8)

    try:
        if photometric == "PALETTE COLOR":
            if array.ndim != 2:
                raise ValueError(f"palette image with unexpected shape {array.shape}")
            rgb = np.asarray(apply_color_lut(array, ds))
            palette_bits = _palette_bits(ds)
            if rgb.dtype != np.uint8 and palette_bits <= 8:
                rgb = np.clip(rgb, 0, 255).astype(np.uint8)
            result = _color_to_uint8(rgb, palette_bits)
        elif array.ndim == 3 and array.shape[-1] >= 3:
            color = array[..., :3]
            if photometric.startswith("YBR"):
                color = convert_color_space(color, photometric, "RGB")
            result = _color_to_uint8(color, bits)
        elif array.ndim == 2:
            raw = None if _has_voi(ds) else _for_processing_to_unit(
                np.asarray(apply_modality_lut(array, ds), dtype=np.float64), ds
            )
            if raw is not None:
                unit = raw  # polarity from PixelIntensityRelationshipSign, not photometric
            else:
                unit = _grayscale_to_unit(array, ds)
                if photometric == "MONOCHROME1":
                    unit = 1.0 - unit
            gray = _to_uint8(unit)
            result = np.repeat(gray[..., None], 3, axis=2)
        else:
            raise ValueError(f"unexpected decoded pixel shape {array.shape} ({photometric})")
    except (AttributeError, KeyError, IndexError, TypeError, NotImplementedError) as exc:
        raise ValueError(f"cannot convert {photometric} pixel data to RGB: {exc}") from exc
    return np.ascontiguousarray(result, dtype=np.uint8)


def _is_dicom_file(path: Path) -> bool:
    with path.open("rb") as handle:
        header = handle.read(132)
    return len(header) == 132 and header[128:132] == b"DICM"


def _pillow_to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        return np.repeat(_to_uint8(_stretch(np.asarray(image, dtype=np.float64)))[..., None], 3, 2)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def image_from_file(path: str | os.PathLike[str], frame: int = 0) -> np.ndarray:
    """An image file as uint8 RGB (H, W, 3): PNG/JPEG/TIFF/BMP via Pillow, or DICOM.

    Raises ``ValueError`` for a file that is missing or cannot be read as an image.
    """
    file_path = Path(path)
    try:
        is_dicom = _is_dicom_file(file_path)
    except OSError as exc:
        raise ValueError(f"cannot read image file {file_path}: {exc}") from exc
    if is_dicom:
        return _image_from_dicom_file(file_path, frame)
    try:
        with Image.open(file_path) as image:
            if frame:
                image.seek(frame)
            return _pillow_to_rgb(image)
    except EOFError as exc:
        raise ValueError(f"{file_path} has no frame {frame}") from exc
    except UnidentifiedImageError as exc:
        if file_path.suffix.lower() in (".dcm", ".dicom", ""):
            return _image_from_dicom_file(file_path, frame)
        raise ValueError(f"{file_path} is neither a readable image nor a DICOM file") from exc
    except OSError as exc:
        raise ValueError(f"cannot read image file {file_path}: {exc}") from exc


def _image_from_dicom_file(path: Path, frame: int) -> np.ndarray:
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot read DICOM file {path}: {exc}") from exc
    return image_from_dataset(ds, frame)


# -- where the image is and how it is oriented ------------------------------------------------

# ViewCodeSequence codes (CID 4014) of the two screening views, SNOMED CT and the older SRT form.
_VIEW_CODES = {
    "399162004": "CC",  # cranio-caudal
    "R-10242": "CC",
    "399368009": "MLO",  # medio-lateral oblique
    "R-10226": "MLO",
}
_VIEW_NAMES = frozenset({"CC", "MLO", "ML", "LM", "XCCL", "XCCM", "FB", "SIO", "LMO", "AT"})


def image_laterality(ds: Dataset) -> str | None:
    """'L' or 'R' from ImageLaterality, else Laterality (General Series); None when unknown."""
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(ds.get(keyword) or "").strip().upper()
        if value in ("L", "R"):
            return value
    return None


def view_position(ds: Dataset) -> str | None:
    """The mammography view ('CC', 'MLO', ...) of an image, None when it says none.

    ViewPosition, else the first ViewCodeSequence code, else a view name written into
    PatientOrientation (CBIS-DDSM's secondary captures do that: PatientOrientation 'CC').
    """
    value = str(ds.get("ViewPosition") or "").strip().upper()
    if value:
        return value
    for item in ds.get("ViewCodeSequence") or []:
        code = _VIEW_CODES.get(str(item.get("CodeValue", "")).strip())
        if code:
            return code
    orientation = ds.get("PatientOrientation")
    values = [orientation] if isinstance(orientation, str) else list(orientation or [])
    for raw in values:
        name = str(raw).strip().upper()
        if name in _VIEW_NAMES:
            return name
    return None


def _orientation_pair(ds: Dataset) -> tuple[str, str] | None:
    value = ds.get("PatientOrientation")
    raw = [value] if isinstance(value, str) else list(value or [])
    values = [str(v).strip().upper() for v in raw]
    if len(values) != 2 or not all(v and set(v) <= set("APRLHF") for v in values):
        return None
    return values[0], values[1]


def mammo_flips(ds: Dataset) -> tuple[bool, bool] | None:
    """(flip left-right, flip up-down) that bring a mammogram to the common orientation.

    The common orientation is the way a left breast is hung: chest wall on the left edge, nipple
    pointing right (columns run anterior), head (MLO) or the lateral side (CC) up. Read from
    PatientOrientation when it is a valid pair: a row direction containing P means the chest wall
    is on the right (flip left-right); a column direction containing H means the image is upside
    down, and for a CC view (column direction L or R) one running towards the breast's own side
    means the lateral side is down (flip up-down). Without a valid PatientOrientation the image is
    assumed hung as usual: a right breast (ImageLaterality, else Laterality) is flipped
    left-right. None when neither says anything (the caller decides from the pixels).
    """
    side = image_laterality(ds)
    pair = _orientation_pair(ds)
    if pair is None:
        if side is None:
            return None
        return side == "R", False
    row, column = pair
    flip_lr = "P" in row and "A" not in row
    if "H" in column or "F" in column:
        flip_ud = "H" in column and "F" not in column
    else:
        flip_ud = side is not None and side in column
    return flip_lr, flip_ud


def ultrasound_region(ds: Dataset) -> tuple[int, int, int, int] | None:
    """(top, left, bottom, right), bottom and right exclusive, of the image's tissue region.

    From SequenceOfUltrasoundRegions: the 2D regions (RegionSpatialFormat 1), tissue ones
    (RegionDataType 1) preferred, the largest by area (a dual-view image gives its larger half).
    Region corners are inclusive (PS3.3 C.8.5.5.1). A region overshooting the image (seen in
    real files: MaxX1 = Columns; a copy cut short at the bottom) is clipped to it when at least
    half of it lies inside; one lying mostly outside describes other pixels (seen: a downscaled
    copy keeping its original's regions) and is ignored. None when there is no usable region.
    """
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if rows <= 0 or columns <= 0:
        return None
    candidates: list[tuple[int, bool, tuple[int, int, int, int]]] = []
    for item in ds.get("SequenceOfUltrasoundRegions") or []:
        try:
            if int(item.get("RegionSpatialFormat", 0)) != 1:
                continue
            x0 = int(item.RegionLocationMinX0)
            y0 = int(item.RegionLocationMinY0)
            x1 = int(item.RegionLocationMaxX1)
            y1 = int(item.RegionLocationMaxY1)
            tissue = int(item.get("RegionDataType", 0)) == 1
        except (AttributeError, TypeError, ValueError):
            continue
        if x0 < 0 or y0 < 0 or x1 < x0 or y1 < y0:
            continue
        box = (y0, x0, min(y1 + 1, rows), min(x1 + 1, columns))
        inside = max(box[2] - box[0], 0) * max(box[3] - box[1], 0)
        if inside < 0.5 * (y1 - y0 + 1) * (x1 - x0 + 1):
            continue  # mostly outside the image: it describes other pixels (a resized copy)
        if box[2] - box[0] < 16 or box[3] - box[1] < 16:
            continue
        candidates.append(((box[2] - box[0]) * (box[3] - box[1]), tissue, box))
    if not candidates:
        return None
    return max(candidates, key=lambda c: (c[1], c[0]))[2]


def frame_indices(frames: int, cap: int) -> list[int]:
    """0-based indices of the frames to analyse: all of them, or ``cap`` evenly spaced ones
    (first and last included)."""
    if frames <= 0:
        return []
    if cap <= 0:
        raise ValueError(f"the frame cap must be positive, not {cap}")
    if frames <= cap:
        return list(range(frames))
    if cap == 1:
        return [0]
    return sorted({round(i * (frames - 1) / (cap - 1)) for i in range(cap)})
