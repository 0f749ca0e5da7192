"""The heatmap as a Secondary Capture image in a new series of the source study."""

from __future__ import annotations

import copy

import highdicom as hd
import numpy as np
from pydicom import Dataset

from inference.prediction import Prediction
from reports import codes
from reports._source import copy_patient_study, laterality, patient_orientation
from reports.overlay import render_overlay

SC_SERIES_DESCRIPTION = "breastcad AI heatmap"

# highdicom's SCImage insists on a PatientOrientation for the PATIENT coordinate system and only
# takes single-letter values; the real value (or an empty Type 2 value) replaces this one.
_PLACEHOLDER_ORIENTATION = ("A", "F")


def _is_slide(source: Dataset) -> bool:
    return bool(source.get("Modality") == "SM" and source.get("ContainerIdentifier")
                and source.get("SpecimenDescriptionSequence"))


def _source_image_item(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = [
        hd.sr.CodedConcept.from_code(codes.SOURCE_IMAGE_FOR_PROCESSING)
    ]
    return item


def build_heatmap_sc(
    source: Dataset,
    image: np.ndarray,
    prediction: Prediction,
    *,
    series_instance_uid: str,
    series_number: int,
    sop_instance_uid: str,
    instance_number: int,
    manufacturer: str,
    software_version: str,
) -> hd.sc.SCImage:
    """An RGB Secondary Capture of :func:`reports.overlay.render_overlay` for one source image.

    Patient and study attributes are copied verbatim from ``source``; Laterality is the source's
    (ImageLaterality, else Laterality) or empty (Type 2C, which dciodvfy accepts);
    PatientOrientation is the source's or empty. A slide-microscopy source gives a SLIDE
    coordinate system with its container and specimen descriptions.
    """
    pixels = render_overlay(image, prediction)
    slide = _is_slide(source)
    orientation = patient_orientation(source)
    single_letters = orientation is not None and all(len(v) == 1 for v in orientation)
    side = laterality(source)
    pixel_spacing = source.get("PixelSpacing")
    spacing: tuple[float, float] | None = None
    if (not slide and pixel_spacing is not None and len(pixel_spacing) == 2
            and (image.shape[0], image.shape[1]) == (source.get("Rows"), source.get("Columns"))):
        spacing = (float(pixel_spacing[0]), float(pixel_spacing[1]))

    sc = hd.sc.SCImage(
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="SLIDE" if slide else "PATIENT",
        study_instance_uid=source.StudyInstanceUID,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        pixel_spacing=spacing,
        laterality=None if slide else side,
        patient_orientation=(
            None if slide
            else orientation if orientation is not None and single_letters
            else _PLACEHOLDER_ORIENTATION
        ),
        container_identifier=source.get("ContainerIdentifier") if slide else None,
        specimen_descriptions=(
            copy.deepcopy(list(source.SpecimenDescriptionSequence)) if slide else None
        ),
        series_description=SC_SERIES_DESCRIPTION,
        manufacturer_model_name="breastcad",
        software_versions=software_version,
        specific_character_set=source.get("SpecificCharacterSet"),
    )
    # Copied after construction so that values highdicom's checks would reject but DICOM allows
    # (e.g. a single-component PatientName without '^') are kept exactly as the PACS has them.
    copy_patient_study(sc, source)
    if slide:
        issuer = source.get("IssuerOfTheContainerIdentifierSequence")
        if issuer:
            sc.IssuerOfTheContainerIdentifierSequence = copy.deepcopy(issuer)
        # dciodvfy: a slide image has no Laterality, and an empty PatientOrientation (Type 2C).
        sc.PatientOrientation = []
    else:
        if orientation is None:
            sc.PatientOrientation = []  # Type 2C: present, empty
        elif not single_letters:
            sc.PatientOrientation = list(orientation)
        if side is None:
            # General Series Laterality is Type 2C; an empty value says "unknown" (absent is an
            # error for dciodvfy, empty a warning).
            sc.Laterality = ""
    sc.BurnedInAnnotation = "YES"
    sc.SourceImageSequence = [_source_image_item(source)]
    sc.DerivationDescription = (
        f"Heatmap of {prediction.model_name} {prediction.model_version} blended over the source "
        "image (jet colour map, alpha 0.4); legend burned in"
    )[:1024]
    if source.get("LossyImageCompression") == "01":
        sc.LossyImageCompression = "01"
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in source:
                sc[keyword] = copy.deepcopy(source[keyword])
    return sc
