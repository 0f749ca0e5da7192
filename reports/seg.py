"""The heatmap as a DICOM Segmentation (FRACTIONAL, PROBABILITY) for viewers that show overlays.

Why a Segmentation and not a Grayscale Softcopy Presentation State: a GSPS can only draw
graphics and text, or a 1-bit overlay, on the source image; the heatmap is a continuous map in
[0, 1], which a fractional SEG carries as such (0..255 per pixel, PROBABILITY), and viewers that
support SEG (OHIF, 3D Slicer, Horos, many PACS viewers) colour it over the source themselves.

One SEG per source image, with one segment "AI attention map (Grad-CAM)" whose algorithm
identification names the model. Built with highdicom (valid at construction), with the UIDs
given by the caller (deterministic, ``reports.uids``) and the patient/study copied from the source.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes as dicom_codes

from inference.prediction import Prediction
from reports import codes
from reports._source import copy_patient_study, patient_orientation

SEG_SERIES_DESCRIPTION = "breastcad AI heatmap (SEG) - not for diagnostic use alone"
SEGMENT_LABEL = "AI attention map (Grad-CAM)"
# category SCT 49755003 "Morphologically abnormal structure"; the property is private: no
# standard concept names "where a classifier looked"
CATEGORY = dicom_codes.SCT.MorphologicallyAbnormalStructure
ATTENTION = codes.ATTENTION_MAP
_NAMES = frozenset({"PatientName", "ReferringPhysicianName"})


def seg_unsupported(source: Dataset) -> str | None:
    """Why no heatmap SEG can be made for this source, or None when one can."""
    if str(source.get("Modality", "")) == "SM":
        return ("a heatmap SEG of a slide is not supported (its heatmap is of a thumbnail, not "
                "of the source frame)")
    frames = int(source.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        return (f"a heatmap SEG of a multi-frame source is not supported (the heatmap is of "
                f"frame 1 of {frames})")
    return None


def build_heatmap_seg(
    source: Dataset,
    prediction: Prediction,
    *,
    series_instance_uid: str,
    series_number: int,
    sop_instance_uid: str,
    instance_number: int,
    manufacturer: str,
    software_version: str,
) -> hd.seg.Segmentation:
    """A FRACTIONAL (PROBABILITY) Segmentation of ``prediction.heatmap`` over ``source``.

    The heatmap must have the source's Rows x Columns (it is made on the source's display
    image); a whole-slide or multi-frame source is refused with ValueError
    (:func:`seg_unsupported`).
    """
    reason = seg_unsupported(source)
    if reason is not None:
        raise ValueError(reason)
    rows, columns = int(source.Rows), int(source.Columns)
    heatmap = np.asarray(prediction.heatmap, dtype=np.float32)
    if heatmap.shape != (rows, columns):
        raise ValueError(f"heatmap is {heatmap.shape[0]}x{heatmap.shape[1]}, the source is "
                         f"{rows}x{columns} (Rows x Columns)")
    if not np.all(np.isfinite(heatmap)) or heatmap.min() < 0.0 or heatmap.max() > 1.0:
        raise ValueError("heatmap values must be finite and in [0, 1]")
    algorithm = hd.AlgorithmIdentificationSequence(
        name=prediction.model_name,
        family=dicom_codes.cid7162.ArtificialIntelligence,
        version=prediction.model_version,
        parameters={"sha256": prediction.model_sha256},
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=CATEGORY,
        segmented_property_type=ATTENTION,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    # highdicom checks the names it copies and warns with the name in the message (a patient
    # name in the logs): it gets a copy without them; they are copied verbatim afterwards
    view = Dataset()
    for element in source:
        if element.keyword not in _NAMES:
            view.add(element)
    if hasattr(source, "file_meta"):
        view.file_meta = source.file_meta
    view.PatientName = None
    view.ReferringPhysicianName = None
    seg = hd.seg.Segmentation(
        source_images=[view],
        pixel_array=heatmap[np.newaxis, :, :],
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        segment_descriptions=[segment],
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        manufacturer_model_name="breastcad",
        software_versions=software_version,
        device_serial_number="none",
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        max_fractional_value=255,
        content_label="AI_HEATMAP",
        content_description=f"AI {prediction.label} {prediction.probability:.2f}"[:64],
        omit_empty_frames=False,
    )
    seg.SeriesDescription = SEG_SERIES_DESCRIPTION
    # General Image PatientOrientation is Type 2C for an image without a plane geometry: the
    # source's pair when it has a valid one, else empty (unknown)
    orientation = patient_orientation(source)
    seg.PatientOrientation = list(orientation) if orientation is not None else ""
    # the private segmented property's coding scheme is declared, as in the SR
    seg.CodingSchemeIdentificationSequence = [codes.private_coding_scheme()]
    copy_patient_study(seg, source)
    return seg
