"""VL Whole Slide Microscopy pyramids for tests and benchmarks, written tile by tile.

``write_pyramid`` writes one TILED_FULL instance per pyramid level (each level half the size of
the one below), every frame encoded as it is rendered and appended to the file, so a 40k x 40k
slide is written in bounded memory: ``render(downsample, x, y, w, h)`` supplies the pixels of a
region of the level that is ``downsample`` times smaller than the base. The header is built with
pydicom (all modules of the VL Whole Slide Microscopy Image IOD that dciodvfy asks for), the
encapsulated Pixel Data is written by hand after it (Basic Offset Table empty, one item per frame).

``idc_patient_slide`` assembles one patient's real IDC H&E patches at their (x, y) on a glass
background, the positives known: the realistic test slide of issue #4.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from PIL import Image, ImageCms
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    JPEG2000,
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

from inference.wsi.split import IdcPatch, patches_by_split, read_idc_patches

VL_WSI_STORAGE = "1.2.840.10008.5.1.4.1.1.77.1.6"
IDC_PATCH = 50
IDC_MPP = 4.0
GLASS = 238

Render = Callable[[int, int, int, int, int], npt.NDArray[np.uint8]]


@dataclass(frozen=True)
class SlidePatient:
    """Patient and study attributes of a generated slide."""

    patient_name: str = "Slide^Test"
    patient_id: str = "WSI-0001"
    study_instance_uid: str = field(default_factory=lambda: str(generate_uid()))
    series_instance_uid: str = field(default_factory=lambda: str(generate_uid()))
    container_identifier: str = "S26-0001-A1"
    accession_number: str = "WSI26001"


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _srgb_profile() -> bytes:
    return bytes(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())


def _header(
    patient: SlidePatient,
    *,
    width: int,
    height: int,
    mpp: float,
    tile: int,
    frames: int,
    base: bool,
    instance_number: int,
    frame_of_reference: str,
    dimension_organization: str,
    specimen_uid: str,
    transfer_syntax: str,
) -> Dataset:
    ds = Dataset()
    sop_uid = generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = VL_WSI_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    image_type = (
        ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
        if base
        else ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
    )
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = image_type
    ds.SOPClassUID = VL_WSI_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "20261122"
    ds.StudyTime = "010000"
    ds.ContentDate = "20261122"
    ds.ContentTime = "010000"
    ds.AcquisitionDateTime = "20261122010000"
    ds.AccessionNumber = patient.accession_number
    ds.Modality = "SM"
    ds.Manufacturer = "breastcad tests"
    ds.ManufacturerModelName = "wsi_factory"
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = "1"
    ds.ReferringPhysicianName = ""
    ds.VolumetricProperties = "VOLUME"
    ds.PatientName = patient.patient_name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "F"
    ds.StudyInstanceUID = patient.study_instance_uid
    ds.SeriesInstanceUID = patient.series_instance_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.FrameOfReferenceUID = frame_of_reference
    ds.PositionReferenceIndicator = "SLIDE_CORNER"
    ds.AcquisitionDuration = 0.0
    organisation = Dataset()
    organisation.DimensionOrganizationUID = dimension_organization
    ds.DimensionOrganizationSequence = DicomSequence([organisation])
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.SamplesPerPixel = 3
    if transfer_syntax == JPEGBaseline8Bit:
        ds.PhotometricInterpretation = "YBR_FULL_422"
    elif transfer_syntax == JPEG2000:
        ds.PhotometricInterpretation = "YBR_ICT"
    else:
        ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.NumberOfFrames = frames
    ds.Rows = tile
    ds.Columns = tile
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"
    lossy = transfer_syntax in (JPEGBaseline8Bit, JPEG2000)
    ds.LossyImageCompression = "01" if lossy else "00"
    if lossy:
        ds.LossyImageCompressionRatio = 10.0
        ds.LossyImageCompressionMethod = (
            "ISO_10918_1" if transfer_syntax == JPEGBaseline8Bit else "ISO_15444_1"
        )
    ds.ContainerIdentifier = patient.container_identifier
    ds.IssuerOfTheContainerIdentifierSequence = DicomSequence([])
    ds.ContainerTypeCodeSequence = DicomSequence([_code("433466003", "SCT", "Microscope slide")])
    ds.AcquisitionContextSequence = DicomSequence([])
    specimen = Dataset()
    specimen.SpecimenIdentifier = patient.container_identifier
    specimen.SpecimenUID = specimen_uid
    specimen.IssuerOfTheSpecimenIdentifierSequence = DicomSequence([])
    specimen.SpecimenPreparationSequence = DicomSequence([])
    specimen.PrimaryAnatomicStructureSequence = DicomSequence(
        [_code("76752008", "SCT", "Breast")]
    )
    ds.SpecimenDescriptionSequence = DicomSequence([specimen])
    spacing_mm = mpp / 1000.0
    ds.ImagedVolumeWidth = width * spacing_mm
    ds.ImagedVolumeHeight = height * spacing_mm
    ds.ImagedVolumeDepth = 0.005
    ds.TotalPixelMatrixColumns = width
    ds.TotalPixelMatrixRows = height
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem = "20.0"
    origin.YOffsetInSlideCoordinateSystem = "40.0"
    ds.TotalPixelMatrixOriginSequence = DicomSequence([origin])
    ds.SpecimenLabelInImage = "NO"
    ds.FocusMethod = "AUTO"
    ds.ExtendedDepthOfField = "NO"
    ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
    optical_path = Dataset()
    optical_path.IlluminationTypeCodeSequence = DicomSequence(
        [_code("111744", "DCM", "Brightfield illumination")]
    )
    optical_path.ICCProfile = _srgb_profile()
    optical_path.OpticalPathIdentifier = "1"
    optical_path.IlluminationColorCodeSequence = DicomSequence(
        [_code("414298005", "SCT", "Full Spectrum")]
    )
    ds.OpticalPathSequence = DicomSequence([optical_path])
    ds.NumberOfOpticalPaths = 1
    ds.TotalPixelMatrixFocalPlanes = 1
    measures = Dataset()
    measures.SliceThickness = 0.005
    measures.PixelSpacing = [f"{spacing_mm:.8g}", f"{spacing_mm:.8g}"]
    frame_type = Dataset()
    frame_type.FrameType = image_type
    shared = Dataset()
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.WholeSlideMicroscopyImageFrameTypeSequence = DicomSequence([frame_type])
    optical = Dataset()
    optical.OpticalPathIdentifier = "1"
    shared.OpticalPathIdentificationSequence = DicomSequence([optical])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    return ds


def _encode(tile: npt.NDArray[np.uint8], transfer_syntax: str, quality: int) -> bytes:
    if transfer_syntax == ExplicitVRLittleEndian:
        return np.ascontiguousarray(tile).tobytes()
    buffer = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(tile))
    if transfer_syntax == JPEGBaseline8Bit:
        image.save(buffer, format="JPEG", quality=quality, subsampling="4:2:2")
    elif transfer_syntax == JPEG2000:
        image.save(
            buffer, format="JPEG2000", irreversible=True, quality_mode="rates",
            quality_layers=[10], no_jp2=True, mct=1,
        )
    else:
        raise ValueError(f"cannot encode transfer syntax {transfer_syntax}")
    return buffer.getvalue()


def _is_glass(tile: npt.NDArray[np.uint8]) -> bool:
    return int(tile.min()) >= GLASS - 12


def _sparse_positions(
    ds: Dataset, kept: list[tuple[int, int]], tile: int, spacing_mm: float
) -> None:
    """TILED_SPARSE: one Plane Position (Slide) per frame and the dimensions that index them."""
    ds.DimensionOrganizationType = "TILED_SPARSE"
    organisation = ds.DimensionOrganizationSequence[0].DimensionOrganizationUID
    indices = []
    for pointer, label in ((0x0048021E, "Column position"), (0x0048021F, "Row position")):
        item = Dataset()
        item.DimensionOrganizationUID = organisation
        item.DimensionIndexPointer = pointer
        item.FunctionalGroupPointer = 0x0048021A
        item.DimensionDescriptionLabel = label
        indices.append(item)
    ds.DimensionIndexSequence = DicomSequence(indices)
    frames = []
    for r, c in kept:
        position = Dataset()
        column, row = c * tile + 1, r * tile + 1
        position.ColumnPositionInTotalImagePixelMatrix = column
        position.RowPositionInTotalImagePixelMatrix = row
        position.XOffsetInSlideCoordinateSystem = f"{20.0 - (row - 1) * spacing_mm:.6f}"
        position.YOffsetInSlideCoordinateSystem = f"{40.0 - (column - 1) * spacing_mm:.6f}"
        position.ZOffsetInSlideCoordinateSystem = "0.0"
        content = Dataset()
        content.DimensionIndexValues = [column, row]
        frame = Dataset()
        frame.PlanePositionSlideSequence = DicomSequence([position])
        frame.FrameContentSequence = DicomSequence([content])
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)


def write_pyramid(
    out_dir: Path,
    render: Render,
    width: int,
    height: int,
    mpp: float,
    *,
    levels: int | None = None,
    patient: SlidePatient | None = None,
    tile: int = 256,
    transfer_syntax: str = JPEGBaseline8Bit,
    quality: int = 90,
    min_level_size: int = 256,
    sparse: bool = False,
) -> list[Path]:
    """Write the pyramid of a ``width`` x ``height`` slide at ``mpp`` µm/pixel; one file a level.

    ``render(downsample, x, y, w, h)`` returns the (h, w, 3) uint8 region at that downsample
    (pixel coordinates of that level). Levels go down by 2 until both sides are at most
    ``min_level_size`` (or ``levels`` levels). Returns the files, base level first.
    ``sparse`` writes TILED_SPARSE instances that leave out the tiles of bare glass, each frame
    with its position (a test-size option: the slide is rendered twice).
    """
    patient = patient or SlidePatient()
    out_dir.mkdir(parents=True, exist_ok=True)
    frame_of_reference = str(generate_uid())
    dimension_organization = str(generate_uid())
    specimen_uid = str(generate_uid())
    paths: list[Path] = []
    index = 0
    while True:
        downsample = 1 << index
        level_w = max(1, -(-width // downsample))
        level_h = max(1, -(-height // downsample))
        cols, rows = -(-level_w // tile), -(-level_h // tile)
        kept = [(r, c) for r in range(rows) for c in range(cols)]
        if sparse:
            kept = []
            for r in range(rows):
                band = render(downsample, 0, r * tile, cols * tile, tile)
                kept += [
                    (r, c) for c in range(cols)
                    if not _is_glass(band[:, c * tile : (c + 1) * tile])
                ]
            if not kept:
                kept = [(0, 0)]
        ds = _header(
            patient,
            width=level_w,
            height=level_h,
            mpp=mpp * downsample,
            tile=tile,
            frames=len(kept),
            base=index == 0,
            instance_number=index + 1,
            frame_of_reference=frame_of_reference,
            dimension_organization=dimension_organization,
            specimen_uid=specimen_uid,
            transfer_syntax=transfer_syntax,
        )
        if sparse:
            _sparse_positions(ds, kept, tile, mpp * downsample / 1000.0)
        wanted = set(kept)
        path = out_dir / f"level-{index}.dcm"
        encapsulated = transfer_syntax != ExplicitVRLittleEndian
        if not encapsulated:
            ds.PixelData = b"\0" * (len(kept) * tile * tile * 3)
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        with path.open("r+b") as handle:
            if encapsulated:
                handle.seek(0, io.SEEK_END)
                handle.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF))
                handle.write(struct.pack("<HHI", 0xFFFE, 0xE000, 0))  # empty offset table
            else:
                # native pixels overwrite the placeholder in place
                handle.seek(path.stat().st_size - len(kept) * tile * tile * 3)
            for r in range(rows):
                if not any((r, c) in wanted for c in range(cols)):
                    continue
                band = render(downsample, 0, r * tile, cols * tile, tile)
                for c in range(cols):
                    if (r, c) not in wanted:
                        continue
                    part = np.ascontiguousarray(band[:, c * tile : (c + 1) * tile])
                    if not encapsulated:
                        handle.write(part.tobytes())
                        continue
                    data = _encode(part, transfer_syntax, quality)
                    if len(data) % 2:
                        data += b"\0"
                    handle.write(struct.pack("<HHI", 0xFFFE, 0xE000, len(data)))
                    handle.write(data)
            if encapsulated:
                handle.write(struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
        paths.append(path)
        index += 1
        if levels is not None and index >= levels:
            break
        if levels is None and level_w <= min_level_size and level_h <= min_level_size:
            break
    return paths


def glass(height: int, width: int, seed: int) -> npt.NDArray[np.uint8]:
    """Background of a slide scan: near-white, faintly noisy glass."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(-3, 4, size=(height, width, 1), dtype=np.int16)
    return np.clip(GLASS + noise + np.array([0, -1, 1], dtype=np.int16), 0, 255).astype(np.uint8)


def load_patch(data_dir: Path, patch: IdcPatch) -> npt.NDArray[np.uint8]:
    with Image.open(data_dir / patch.path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


@dataclass
class AssembledSlide:
    """A slide assembled from IDC patches at the analysis spacing (``IDC_MPP``).

    ``truth`` has one cell per 50 x 50 patch position of the canvas: 1 where an IDC patch lies,
    0 where a non-IDC patch lies, -1 where there is only glass.
    """

    canvas: npt.NDArray[np.uint8]
    truth: npt.NDArray[np.int8]
    patient_id: str
    patches: list[IdcPatch]


def assemble_patient(data_dir: Path, patient_id: str, margin_patches: int = 2) -> AssembledSlide:
    """One patient's patches at their (x, y) on glass, aligned so each patch is one grid cell."""
    patches = [p for p in read_idc_patches(data_dir) if p.patient_id == patient_id]
    if not patches:
        raise ValueError(f"no IDC patches of patient {patient_id}")
    # the patches of a slide sit on a 50-pixel grid with an offset (x = 1, 51, 101, ...)
    x0 = min(p.x for p in patches) - margin_patches * IDC_PATCH
    y0 = min(p.y for p in patches) - margin_patches * IDC_PATCH
    cols = (max(p.x for p in patches) - x0) // IDC_PATCH + 1 + margin_patches
    rows = (max(p.y for p in patches) - y0) // IDC_PATCH + 1 + margin_patches
    canvas = glass(rows * IDC_PATCH, cols * IDC_PATCH, seed=int(patient_id))
    truth = np.full((rows, cols), -1, dtype=np.int8)
    for patch in patches:
        pixels = load_patch(data_dir, patch)
        px, py = patch.x - x0, patch.y - y0
        h, w = pixels.shape[:2]
        canvas[py : py + h, px : px + w] = pixels
        truth[py // IDC_PATCH, px // IDC_PATCH] = patch.label
    return AssembledSlide(canvas=canvas, truth=truth, patient_id=patient_id, patches=patches)


def canvas_render(canvas: npt.NDArray[np.uint8], upsample: int = 1) -> Render:
    """A renderer of an in-memory canvas (``upsample`` times enlarged, nearest neighbour)."""
    base_h, base_w = canvas.shape[0] * upsample, canvas.shape[1] * upsample
    cache: dict[int, npt.NDArray[np.uint8]] = {}

    def level_image(downsample: int) -> npt.NDArray[np.uint8]:
        if downsample not in cache:
            size = (max(1, -(-base_w // downsample)), max(1, -(-base_h // downsample)))
            if upsample == downsample:
                cache[downsample] = canvas
            else:
                resample = (
                    Image.Resampling.NEAREST if upsample > downsample else Image.Resampling.BOX
                )
                cache[downsample] = np.asarray(Image.fromarray(canvas).resize(size, resample))
        return cache[downsample]

    def render(downsample: int, x: int, y: int, w: int, h: int) -> npt.NDArray[np.uint8]:
        image = level_image(downsample)
        out = np.full((h, w, 3), GLASS, dtype=np.uint8)
        part = image[y : y + h, x : x + w]
        out[: part.shape[0], : part.shape[1]] = part
        return out

    return render


def split_test_patients(data_dir: Path, min_positive: int = 8, min_patches: int = 25) -> list[str]:
    """Patients of the TEST split with at least ``min_positive`` IDC patches, most first."""
    split = patches_by_split(read_idc_patches(data_dir))
    counts: dict[str, list[int]] = {}
    for patch in split["test"]:
        counts.setdefault(patch.patient_id, []).append(patch.label)
    chosen = [
        pid
        for pid, labels in counts.items()
        if sum(labels) >= min_positive and len(labels) >= min_patches
    ]
    return sorted(chosen, key=lambda pid: (-sum(counts[pid]), pid))


def write_patient_slide(
    data_dir: Path,
    patient_id: str,
    out_dir: Path,
    *,
    upsample: int = 2,
    transfer_syntax: str = JPEGBaseline8Bit,
    patient: SlidePatient | None = None,
    sparse: bool = False,
) -> tuple[list[Path], AssembledSlide]:
    """A patient's assembled slide as a pyramid whose base is ``upsample`` x finer than 4 µm."""
    assembled = assemble_patient(data_dir, patient_id)
    height, width = assembled.canvas.shape[:2]
    paths = write_pyramid(
        out_dir,
        canvas_render(assembled.canvas, upsample),
        width * upsample,
        height * upsample,
        IDC_MPP / upsample,
        patient=patient,
        transfer_syntax=transfer_syntax,
        sparse=sparse,
    )
    return paths, assembled


def grid_iou(predicted: npt.NDArray[np.bool_], truth: npt.NDArray[np.bool_]) -> float:
    """Intersection over union of two boolean tile grids (cropped to the common size)."""
    rows = min(predicted.shape[0], truth.shape[0])
    cols = min(predicted.shape[1], truth.shape[1])
    p, t = predicted[:rows, :cols], truth[:rows, :cols]
    union = int((p | t).sum()) + int(predicted.sum() - p.sum()) + int(truth.sum() - t.sum())
    return float((p & t).sum()) / union if union else 1.0


def patient_ids(patches: Sequence[IdcPatch]) -> list[str]:
    return sorted({p.patient_id for p in patches}, key=lambda pid: (len(pid), pid))


def make_patch_model(directory: Path, seed: int = 0) -> Path:
    """A small, untrained SM patch model (BusiCNN, labels non_idc/idc, 50 px) and its card.

    For tests of the pipeline's mechanics (batching, streaming, equality with
    ``Classifier.predict_batch``): its outputs are deterministic but meaningless.
    """
    import json

    import torch

    from inference.card import sha256_file
    from inference.networks import BusiCNN

    params = {
        "in_channels": 1,
        "num_classes": 2,
        "widths": [8, 16],
        "blocks_per_stage": 1,
        "dropout": 0.0,
        "stem_pool": False,
    }
    torch.manual_seed(seed)
    network = BusiCNN(**params)  # type: ignore[arg-type]
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / "sm_untrained.pt"
    torch.save(network.state_dict(), weights)
    card = {
        "name": "sm_untrained",
        "version": "0.0.1",
        "modality": "SM",
        "architecture": "BusiCNN",
        "architecture_params": params,
        "input_size": 50,
        "in_channels": 1,
        "labels": ["non_idc", "idc"],
        "weights": weights.name,
        "sha256": sha256_file(weights),
        "test_time_augmentation": "hflip",
        "temperature": 1.5,
    }
    path = directory / "sm_untrained.json"
    path.write_text(json.dumps(card))
    return path
