"""The TID 1500 Measurement Report (Comprehensive 3D SR) of a series' AI finding."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes as dicom_codes

from inference.prediction import Prediction
from reports import codes
from reports._source import copy_patient_study, laterality, reference_view
from reports.slide import slide_measurements

SR_SERIES_DESCRIPTION = "breastcad AI findings"
DEVICE_OBSERVER_NAME = "breastcad"
TRACKING_IDENTIFIER = "breastcad series finding"
BILATERAL = dicom_codes.cid244.Bilateral  # SCT 51440002 "Right and left" (a study finding)

_PROJECTION_MODALITIES = frozenset({"CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA"})
_CROSS_SECTIONAL_MODALITIES = frozenset({"CT", "MR", "PT"})


@dataclass(frozen=True)
class SimilarCase:
    """A past case whose images look like this one's to the model (embedding retrieval)."""

    study_instance_uid: str
    label: str
    distance: float


def similar_case_items(cases: Sequence[SimilarCase]) -> list[hd.sr.ContainerContentItem]:
    """One CONTAINER "Similar case" (99BCAD) per case: its Study Instance UID (DCM 110180), its
    finding (99BCAD SIMFINDING = the coded class) and the cosine distance (99BCAD COSDIST,
    UCUM "1")."""
    items = []
    for case in cases:
        container = hd.sr.ContainerContentItem(
            name=codes.SIMILAR_CASE, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )
        container.ContentSequence = hd.sr.ContentSequence([
            hd.sr.UIDRefContentItem(
                name=codes.STUDY_INSTANCE_UID,
                value=case.study_instance_uid,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            ),
            hd.sr.CodeContentItem(
                name=codes.SIMILAR_CASE_FINDING,
                value=codes.class_concepts(case.label).finding,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            ),
            hd.sr.NumContentItem(
                name=codes.COSINE_DISTANCE,
                value=float(case.distance),
                unit=codes.NO_UNITS,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            ),
        ])
        items.append(container)
    return items


def _library_entry_ok(view: Dataset) -> bool:
    """Whether highdicom's TID 1601 image library entry can describe this image.

    Projection images need PatientOrientation and ImagerPixelSpacing, cross-sectional ones a
    plane geometry we never see here; an image without them is still referenced by the
    measurement group and the evidence sequence.
    """
    if not (view.get("Rows") and view.get("Columns")):
        return False
    modality = view.get("Modality")
    if modality in _CROSS_SECTIONAL_MODALITIES:
        return False
    if modality in _PROJECTION_MODALITIES:
        orientation = view.get("PatientOrientation")
        spacing = view.get("ImagerPixelSpacing")
        return (orientation is not None and not isinstance(orientation, str)
                and len(orientation) == 2 and spacing is not None and len(spacing) == 2)
    return True


@dataclass(frozen=True)
class FindingGroup:
    """One TID 1501 measurement group: the finding about some of the sources.

    ``source_indices`` index the ``sources`` of :func:`build_sr`; ``laterality`` ('L', 'R') is
    the finding site's (a per-breast group), 'B' both breasts (SCT 51440002, a mammography
    study's finding over both), None to take it from the sources when they agree;
    ``tracking_uid`` must be unique per group (:func:`reports.build_results` derives one when it
    is empty).
    """

    prediction: Prediction
    source_indices: tuple[int, ...]
    laterality: str | None = None
    tracking_identifier: str = TRACKING_IDENTIFIER
    tracking_uid: str = ""


def _finding_site(sources: Sequence[Dataset], side: str | None = None) -> hd.sr.FindingSite:
    if side is None:
        sides = {laterality(source) for source in sources}
        side = sides.pop() if len(sides) == 1 else None
    return hd.sr.FindingSite(
        anatomic_location=codes.BREAST,
        laterality={"R": codes.RIGHT, "L": codes.LEFT, "B": BILATERAL}.get(side or ""),
    )


def _measurements(prediction: Prediction) -> list[hd.sr.Measurement]:
    measurements = [
        hd.sr.Measurement(
            name=codes.class_concepts(label).probability,
            value=float(prediction.probabilities[label]),
            unit=codes.NO_UNITS,
        )
        for label in prediction.labels
    ]
    if prediction.ood_score is not None:
        measurements.append(
            hd.sr.Measurement(name=codes.OOD_SCORE, value=float(prediction.ood_score),
                              unit=codes.NO_UNITS)
        )
    measurements += slide_measurements(prediction)  # whole slides: areas, fraction, tiles
    return measurements


def _evaluations(
    prediction: Prediction, priority: bool | None
) -> list[hd.sr.QualitativeEvaluation]:
    evaluations = [
        hd.sr.QualitativeEvaluation(
            name=codes.ASSESSABLE,
            value=codes.NO if prediction.not_assessable else codes.YES,
        )
    ]
    if priority is not None:
        evaluations.append(
            hd.sr.QualitativeEvaluation(
                name=codes.PRIORITY,
                value=codes.HIGH_PRIORITY if priority else codes.NORMAL_PRIORITY,
            )
        )
    return evaluations


def build_sr(
    sources: Sequence[Dataset],
    series_prediction: Prediction,
    *,
    series_instance_uid: str,
    series_number: int,
    sop_instance_uid: str,
    tracking_uid: str,
    device_observer_uid: str,
    manufacturer: str,
    software_version: str,
    priority: bool | None = None,
    predecessor: Dataset | None = None,
    groups: Sequence[FindingGroup] | None = None,
    frame_numbers: Sequence[int | None] | None = None,
    similar_cases: Sequence[SimilarCase] = (),
) -> hd.sr.Comprehensive3DSR:
    """A Comprehensive 3D SR with one TID 1501 measurement group for ``series_prediction``, or
    one per item of ``groups`` (e.g. one per breast of a mammography series).

    The group holds: tracking identifier, the finding (the coded predicted class), finding site
    breast (with laterality when all sources agree), the algorithm (TID 4019: name, version, and
    ``sha256=<model_sha256>`` as its parameter), the probability of every class (99BCAD codes,
    UCUM "1"), the OOD score if any, whether the image was assessable, the triage finding
    (SCT 260870009 "Priority" = SCT 394849002 "High priority" or 394848005 "Normal priority")
    unless ``priority`` is None, and every source image. ``predecessor`` (an earlier breastcad
    SR of the same study that this one supersedes) goes into the Predecessor Documents Sequence.

    ``groups`` replace the single series group: each has its own tracking UID, finding, finding
    site laterality, probabilities and source images (the triage finding is the series' own,
    written into every group). ``frame_numbers[i]`` (1-based, or None) is the frame of
    ``sources[i]`` that the finding refers to (the most suspicious frame of a multi-frame
    image): it is the Referenced Frame Number of that source image in the groups.

    ``similar_cases`` (nearest past cases of other studies) are listed in the last measurement
    group whose prediction is ``series_prediction`` (a mammography study's own group, after its
    breasts'; the first group if none is),
    one "Similar case" container each (:func:`similar_case_items`).
    """
    if frame_numbers is not None and len(frame_numbers) != len(sources):
        raise ValueError(f"{len(frame_numbers)} frame numbers for {len(sources)} sources")
    if groups is None:
        groups = [FindingGroup(prediction=series_prediction,
                               source_indices=tuple(range(len(sources))),
                               tracking_uid=tracking_uid)]
    _check_groups(groups, len(sources))
    views = [reference_view(source) for source in sources]
    # highdicom would pass the evidence's names through its person-name check, which rejects
    # nothing but warns with the name in the message (a patient name in the logs); the names are
    # copied verbatim after construction instead.
    evidence = [reference_view(source) for source in sources]
    for view in evidence:
        view.PatientName = None
        view.ReferringPhysicianName = None
    modality = str(views[0].Modality)

    observer = hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept.from_code(codes.DEVICE),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_observer_uid,
            name=DEVICE_OBSERVER_NAME,
            manufacturer_name=manufacturer,
            model_name=series_prediction.model_name,
        ),
    )
    algorithm = hd.sr.AlgorithmIdentification(
        name=series_prediction.model_name,
        version=series_prediction.model_version,
        parameters=[f"sha256={series_prediction.model_sha256}"],
    )

    def frames(index: int) -> list[int] | None:
        number = frame_numbers[index] if frame_numbers is not None else None
        return [int(number)] if number is not None else None

    measurement_groups = [
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=group.tracking_uid, identifier=group.tracking_identifier
            ),
            finding_type=codes.class_concepts(group.prediction.label).finding,
            algorithm_id=algorithm,
            finding_sites=[_finding_site([sources[i] for i in group.source_indices],
                                         group.laterality)],
            measurements=_measurements(group.prediction),
            qualitative_evaluations=_evaluations(group.prediction, priority),
            source_images=[
                hd.sr.SourceImageForMeasurementGroup(
                    referenced_sop_class_uid=views[i].SOPClassUID,
                    referenced_sop_instance_uid=views[i].SOPInstanceUID,
                    referenced_frame_numbers=frames(i),
                )
                for i in group.source_indices
            ],
        )
        for group in groups
    ]
    if similar_cases:
        # after the TID 1501 rows: each similar case's study, finding and distance
        target = max((n for n, g in enumerate(groups) if g.prediction is series_prediction),
                     default=0)
        measurement_groups[target][0].ContentSequence.extend(similar_case_items(similar_cases))
    library = [view for view in views if _library_entry_ok(view)]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.procedure_reported(modality),
        imaging_measurements=measurement_groups,
        referenced_images=library if len(library) == len(views) else None,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=manufacturer,
        is_complete=True,
        series_description=SR_SERIES_DESCRIPTION,
        manufacturer_model_name="breastcad",
        software_versions=software_version,
        coding_schemes=[codes.private_coding_scheme()],
        previous_versions=[predecessor] if predecessor is not None else None,
    )
    copy_patient_study(sr, sources[0])
    return sr


def _check_groups(groups: Sequence[FindingGroup], count: int) -> None:
    if not groups:
        raise ValueError("an SR needs at least one finding group")
    uids = [group.tracking_uid for group in groups]
    if not all(uids) or len(set(uids)) != len(uids):
        raise ValueError("finding groups must have distinct, non-empty tracking UIDs")
    for number, group in enumerate(groups):
        if not isinstance(group, FindingGroup):
            raise ValueError(f"groups[{number}] is a {type(group).__name__}, not a FindingGroup")
        if not group.source_indices:
            raise ValueError(f"groups[{number}] refers to no source image")
        if any(not 0 <= i < count for i in group.source_indices):
            raise ValueError(f"groups[{number}] refers to a source index outside 0..{count - 1}")
        if group.laterality not in (None, "L", "R", "B"):
            raise ValueError(f"groups[{number}]: laterality must be 'L', 'R', 'B' or None, "
                             f"not {group.laterality!r}")
        codes.class_concepts(group.prediction.label)
