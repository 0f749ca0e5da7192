"""Reading what the result objects need from a source instance, and nothing else."""

from __future__ import annotations

import copy
import re

from pydicom import Dataset

# Patient and study attributes copied verbatim from the source into every result object. Only
# these: a source's other patient/study attributes (retired ones, overlong free text) are not
# ours to re-send, and often fail validation.
PATIENT_STUDY_KEYWORDS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "AccessionNumber",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)

# Further attributes highdicom reads from an evidence/library dataset.
_REFERENCE_KEYWORDS: tuple[str, ...] = (
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "FrameOfReferenceUID",
    "PatientOrientation",
    "ImagerPixelSpacing",
)

_REQUIRED_KEYWORDS: tuple[str, ...] = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "Modality",
)

# PS3.3 C.7.6.1.1.1: each Patient Orientation value is one or more of A P R L H F.
_ORIENTATION_VALUE = re.compile(r"^[APRLHF]+$")


def check_source(source: Dataset, index: int) -> None:
    """ValueError unless ``source`` has the UIDs and Modality a result needs."""
    if not isinstance(source, Dataset):
        raise ValueError(f"sources[{index}] is a {type(source).__name__}, not a pydicom Dataset")
    missing = [kw for kw in _REQUIRED_KEYWORDS if not source.get(kw)]
    if missing:
        raise ValueError(f"sources[{index}] lacks {', '.join(missing)}")


def reference_view(source: Dataset) -> Dataset:
    """A copy of ``source`` holding only the attributes the result objects take from it.

    Type 2 patient/study attributes the source lacks (real devices omit them) are present and
    empty in the view, as the result objects need them to be.
    """
    view = Dataset()
    for keyword in PATIENT_STUDY_KEYWORDS + _REFERENCE_KEYWORDS:
        if keyword in source:
            element = source[keyword]
            view[element.tag] = copy.deepcopy(element)
        elif keyword in PATIENT_STUDY_KEYWORDS:
            setattr(view, keyword, None)
    return view


def copy_patient_study(target: Dataset, source: Dataset) -> None:
    """Copy :data:`PATIENT_STUDY_KEYWORDS` from ``source`` into ``target`` verbatim."""
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in source:
            element = source[keyword]
            target[element.tag] = copy.deepcopy(element)
        else:
            setattr(target, keyword, None)  # Type 2: present, empty


def laterality(source: Dataset) -> str | None:
    """'R' or 'L' from the source's ImageLaterality, else its Laterality, else None.

    ImageLaterality 'B' (both) or 'U' (unpaired) has no General Series Laterality equivalent.
    """
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(source.get(keyword) or "").strip().upper()
        if value in ("R", "L"):
            return value
    return None


def patient_orientation(source: Dataset) -> tuple[str, str] | None:
    """The source's PatientOrientation if it is a valid pair (e.g. ('P', 'L'), ('A', 'FR'))."""
    value = source.get("PatientOrientation")
    if value is None:
        return None
    raw = [value] if isinstance(value, str) else list(value)
    values = [str(v).strip() for v in raw]
    values = [v for v in values if v]
    if len(values) != 2 or not all(_ORIENTATION_VALUE.match(v) for v in values):
        return None
    return values[0], values[1]


def positive_int(value: object) -> int | None:
    """``value`` as a positive int (IS attributes), else None."""
    try:
        number = int(str(value))
    except ValueError:
        return None
    return number if number > 0 else None
