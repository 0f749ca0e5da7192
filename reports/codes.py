"""Coded concepts used in breastcad's result objects.

Standard concepts were checked against pydicom's code dictionaries (``pydicom.sr.codedict``) where
they are listed there; ``254837009`` and ``92115009`` are SNOMED CT disorders that those
dictionaries do not list (SNOMED CT: "Malignant neoplasm of breast (disorder)", "Benign neoplasm of
breast (disorder)"). Concepts with no standard code use the private coding scheme ``99BCAD``,
declared in every SR (:func:`private_coding_scheme`).

Constants are immutable :class:`pydicom.sr.coding.Code` tuples; highdicom turns them into fresh
datasets wherever they are used, so no two result objects share a mutable code item.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

PRIVATE_SCHEME_DESIGNATOR = "99BCAD"


def private_coding_scheme() -> CodingSchemeIdentificationItem:
    """A new CodingSchemeIdentificationSequence item declaring the ``99BCAD`` scheme."""
    return CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME_DESIGNATOR,
        name="breastcad private codes",
        responsible_organization="breastcad",
    )


def _private(value: str, meaning: str) -> Code:
    return Code(value=value, scheme_designator=PRIVATE_SCHEME_DESIGNATOR, meaning=meaning)


@dataclass(frozen=True)
class ClassConcepts:
    """The codes of one classifier output class."""

    finding: Code
    probability: Code


_CLASSES: MappingProxyType[str, ClassConcepts] = MappingProxyType({
    "malignant": ClassConcepts(
        finding=Code("254837009", "SCT", "Malignant neoplasm of breast"),
        probability=_private("PMALIGNANT", "Probability of class malignant"),
    ),
    "benign": ClassConcepts(
        finding=Code("92115009", "SCT", "Benign neoplasm of breast"),
        probability=_private("PBENIGN", "Probability of class benign"),
    ),
    # DCM 111287, in CIDs 6030/6031/6054/6057 (breast imaging): codes.DCM.NormalBreastTissue
    "normal": ClassConcepts(
        finding=codes.DCM.NormalBreastTissue,
        probability=_private("PNORMAL", "Probability of class normal"),
    ),
    # SCT 408643008, in CIDs 638/639: codes.SCT.InfiltratingDuctalCarcinomaOfBreast
    "idc": ClassConcepts(
        finding=codes.SCT.InfiltratingDuctalCarcinomaOfBreast,
        probability=_private("PIDC", "Probability of class idc"),
    ),
    # No standard concept says "tissue without invasive ductal carcinoma" (the IDC data set's
    # negative class also holds non-invasive and non-ductal tissue), so this one is private.
    "non_idc": ClassConcepts(
        finding=_private("NONIDC", "No invasive ductal carcinoma"),
        probability=_private("PNONIDC", "Probability of class non_idc"),
    ),
})

KNOWN_LABELS: tuple[str, ...] = tuple(_CLASSES)

# TID 1500 "Procedure reported", by the source's Modality.
_PROCEDURES: MappingProxyType[str, Code] = MappingProxyType({
    "US": codes.SCT.UltrasonographyOfBreast,  # SCT 47079000
    "MG": codes.SCT.Mammography,  # SCT 71651007
    "SM": codes.SCT.Histopathology,  # SCT 252416005
})

KNOWN_MODALITIES: tuple[str, ...] = tuple(_PROCEDURES)

BREAST: Code = codes.SCT.Breast  # SCT 76752008
RIGHT: Code = codes.cid244.Right  # SCT 24028007
LEFT: Code = codes.cid244.Left  # SCT 7771000
YES: Code = codes.SCT.Yes  # SCT 373066001
NO: Code = codes.SCT.No  # SCT 373067005
NO_UNITS: Code = codes.UCUM.NoUnits  # UCUM "1"
DEVICE: Code = codes.cid270.Device  # DCM 121007
# Purpose of reference (CID 7202) of the SC's SourceImageSequence item: DCM 121322
SOURCE_IMAGE_FOR_PROCESSING: Code = codes.DCM.SourceImageForImageProcessingOperation

# The triage finding (TID 1501 qualitative evaluation): SCT 260870009 "Priority (attribute)"
# valued SCT 394849002 "High priority" or SCT 394848005 "Normal priority" (qualifier values).
PRIORITY: Code = codes.SCT.Priority  # SCT 260870009
HIGH_PRIORITY: Code = Code("394849002", "SCT", "High priority")
NORMAL_PRIORITY: Code = Code("394848005", "SCT", "Normal priority")

ASSESSABLE: Code = _private("ASSESSABLE", "Image assessable by the algorithm")
OOD_SCORE: Code = _private("OODSCORE", "Out-of-distribution score")

# Similar past cases (retrieved by embedding): a container per case in the measurement group,
# holding the case's Study Instance UID (DCM 110180), its finding and the cosine distance. The
# finding is named by a private concept, not DCM 121071 "Finding": readers that look for the
# group's finding must not mistake a past case's for it.
SIMILAR_CASE: Code = _private("SIMILARCASE", "Similar case")
STUDY_INSTANCE_UID: Code = codes.DCM.StudyInstanceUID  # DCM 110180
SIMILAR_CASE_FINDING: Code = _private("SIMFINDING", "Finding of the similar case")
# The segmented property of the heatmap SEG: where the classifier looked (no standard concept)
ATTENTION_MAP: Code = _private("ATTNMAP", "AI attention map")
COSINE_DISTANCE: Code = _private("COSDIST", "Cosine distance of image embeddings")


def class_concepts(label: str) -> ClassConcepts:
    """The finding and probability codes of a class label; ValueError for an unknown label."""
    try:
        return _CLASSES[label]
    except KeyError:
        raise ValueError(
            f"no coded concept for class label {label!r}; known labels: {', '.join(KNOWN_LABELS)}"
        ) from None


def procedure_reported(modality: str) -> Code:
    """The TID 1500 procedure reported for a source Modality; ValueError for an unknown one."""
    try:
        return _PROCEDURES[modality]
    except KeyError:
        raise ValueError(
            f"no procedure code for Modality {modality!r}; known: {', '.join(KNOWN_MODALITIES)}"
        ) from None
