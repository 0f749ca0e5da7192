"""All result objects of one analysed series: the SR and one heatmap SC per source image."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image
from pydicom import Dataset

from inference.prediction import Prediction
from reports import codes
from reports._source import check_source, positive_int
from reports.sc import build_heatmap_sc
from reports.seg import build_heatmap_seg, seg_unsupported
from reports.sr import FindingGroup, SimilarCase, build_sr
from reports.uids import derive_uid, source_set

SR_SERIES_NUMBER_OFFSET = 7000
SC_SERIES_NUMBER_OFFSET = 8000
SEG_SERIES_NUMBER_OFFSET = 9000
_MAX_IS = 2**31 - 1
_MAX_LO = 64


@dataclass(frozen=True)
class ResultObjects:
    """The DICOM objects breastcad sends back for one analysed series."""

    sr: Dataset
    heatmaps: list[Dataset]
    # heatmap Segmentations (FRACTIONAL), one per source image, when asked for (with_seg)
    segmentations: list[Dataset] = field(default_factory=list)


def analysis_unit(sources: Sequence[Dataset]) -> str:
    """The first part of every result UID: the sources' SeriesInstanceUID, or their
    StudyInstanceUID when they span several series (a mammography study analysed as one)."""
    series = {str(source.SeriesInstanceUID) for source in sources}
    if len(series) == 1:
        return series.pop()
    return str(sources[0].StudyInstanceUID)


def _instance_number(source: Dataset, index: int, several_series: bool) -> int:
    """The source's InstanceNumber (results sort like their sources); the position in the
    result when the sources come from several series (whose numbers repeat)."""
    if several_series:
        return index + 1
    return positive_int(source.get("InstanceNumber")) or index + 1


def _result_series_number(source: Dataset, offset: int) -> int:
    """``offset`` + the source's SeriesNumber, so results sort beside their source."""
    number = offset + (positive_int(source.get("SeriesNumber")) or 0)
    return number if number <= _MAX_IS else offset


def _check_text(name: str, value: str, limit: int | None = _MAX_LO) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string")
    if limit is not None and len(value) > limit:
        raise ValueError(f"{name} is longer than {limit} characters: {value!r}")
    if "\\" in value:
        raise ValueError(f"{name} must not contain a backslash: {value!r}")


def _check_prediction(name: str, prediction: Prediction, reference: Prediction) -> None:
    if not isinstance(prediction, Prediction):
        raise ValueError(f"{name} is a {type(prediction).__name__}, not a Prediction")
    for label in (prediction.label, *prediction.labels):
        codes.class_concepts(label)
    model = (prediction.model_name, prediction.model_version, prediction.model_sha256)
    expected = (reference.model_name, reference.model_version, reference.model_sha256)
    if model != expected:
        raise ValueError(f"{name} comes from model {model}, series_prediction from {expected}")
    if set(prediction.labels) != set(reference.labels):
        raise ValueError(f"{name} has labels {prediction.labels}, series_prediction "
                         f"{reference.labels}")
    for label, value in prediction.probabilities.items():
        if not np.isfinite(value) or not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{name}: probability of {label!r} is {value}, not in [0, 1]")


def _check_inputs(
    sources: Sequence[Dataset],
    images: Sequence[np.ndarray],
    predictions: Sequence[Prediction],
    series_prediction: Prediction,
) -> None:
    if len(sources) == 0:
        raise ValueError("no source instances")
    if not len(sources) == len(images) == len(predictions):
        raise ValueError(f"{len(sources)} sources, {len(images)} images and "
                         f"{len(predictions)} predictions: need one image and one prediction "
                         "per source")
    for index, source in enumerate(sources):
        check_source(source, index)
    studies = {str(source.get("StudyInstanceUID")) for source in sources}
    if len(studies) != 1:
        raise ValueError(f"sources are not from one study: {len(studies)} StudyInstanceUID "
                         "values")
    series = {str(source.get("SeriesInstanceUID")) for source in sources}
    if len(series) != 1 and {str(source.get("Modality")) for source in sources} != {"MG"}:
        raise ValueError(f"sources are not from one series: {len(series)} SeriesInstanceUID "
                         "values (only a mammography study is analysed across series)")
    sop_uids = [str(source.SOPInstanceUID) for source in sources]
    if len(set(sop_uids)) != len(sop_uids):
        raise ValueError("the same SOPInstanceUID appears more than once in sources")
    modalities = {str(source.Modality) for source in sources}
    if len(modalities) != 1:
        raise ValueError(f"sources have several Modality values: {sorted(modalities)}")
    codes.procedure_reported(modalities.pop())

    _check_prediction("series_prediction", series_prediction, series_prediction)
    _check_text("model_name", series_prediction.model_name, limit=None)
    _check_text("model_version", series_prediction.model_version, limit=None)
    _check_text("model_sha256", series_prediction.model_sha256, limit=None)
    for index, (source, image, prediction) in enumerate(
        zip(sources, images, predictions, strict=True)
    ):
        _check_prediction(f"predictions[{index}]", prediction, series_prediction)
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
                or image.shape[2] != 3:
            shape = getattr(image, "shape", None)
            dtype = getattr(image, "dtype", None)
            raise ValueError(f"images[{index}] must be a uint8 (H, W, 3) array, got {dtype} "
                             f"{shape}")
        # A slide's Rows/Columns are one tile; its display image is a thumbnail of any size. A
        # mammogram may be shown scaled down (workers/mammo.py: mg_max_side), keeping its shape.
        if source.Modality != "SM":
            expected = (int(source.get("Rows") or 0), int(source.get("Columns") or 0))
            shape = (int(image.shape[0]), int(image.shape[1]))
            if shape != expected and not (source.Modality == "MG" and _scaled_down(shape,
                                                                                   expected)):
                raise ValueError(f"images[{index}] is {image.shape[0]}x{image.shape[1]}, "
                                 f"its source is {expected[0]}x{expected[1]} (Rows x Columns)")


def _at_source_size(prediction: Prediction, source: Dataset) -> Prediction:
    """``prediction`` with its heatmap resampled (bilinear) to the source's Rows x Columns (a
    mammogram analysed scaled down)."""
    rows, columns = int(source.get("Rows") or 0), int(source.get("Columns") or 0)
    if prediction.heatmap.shape == (rows, columns) or rows <= 0 or columns <= 0:
        return prediction
    image = Image.fromarray(np.asarray(prediction.heatmap, dtype=np.float32), mode="F")
    full = np.asarray(image.resize((columns, rows), Image.Resampling.BILINEAR), np.float32)
    return replace(prediction, heatmap=np.clip(full, 0.0, 1.0).astype(np.float32))


def _scaled_down(shape: tuple[int, int], full: tuple[int, int]) -> bool:
    """Whether ``shape`` is ``full`` scaled down, its aspect ratio kept (to rounding)."""
    if not (0 < shape[0] <= full[0] and 0 < shape[1] <= full[1]):
        return False
    return abs(shape[0] / full[0] - shape[1] / full[1]) <= 1.0 / min(shape)


def _check_predecessor(predecessor: Dataset, first: Dataset, sr_uid: str) -> None:
    if not isinstance(predecessor, Dataset):
        raise ValueError(f"predecessor is a {type(predecessor).__name__}, not a pydicom Dataset")
    missing = [kw for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID",
                             "SOPInstanceUID") if not predecessor.get(kw)]
    if missing:
        raise ValueError(f"predecessor lacks {', '.join(missing)}")
    if str(predecessor.StudyInstanceUID) != str(first.StudyInstanceUID):
        raise ValueError("predecessor is an SR of another study")
    if str(predecessor.SOPInstanceUID) == sr_uid:
        raise ValueError("predecessor is the SR being built (same sources, same model)")


def build_results(
    sources: Sequence[Dataset],
    images: Sequence[np.ndarray],
    predictions: Sequence[Prediction],
    *,
    series_prediction: Prediction,
    manufacturer: str = "breastcad",
    software_version: str,
    priority: bool | None = None,
    predecessor: Dataset | None = None,
    groups: Sequence[FindingGroup] | None = None,
    frame_numbers: Sequence[int | None] | None = None,
    similar_cases: Sequence[SimilarCase] = (),
    with_seg: bool = False,
) -> ResultObjects:
    """Build the SR and the heatmap SCs for one analysed series.

    ``sources`` are the analysed instances of one series, or of several series of one study (a
    mammography study: its views often come one series each), ``images[i]`` the uint8 RGB
    display image of ``sources[i]`` and ``predictions[i]`` its prediction;
    ``series_prediction`` is the finding the SR reports for the series (the study). Both objects
    go into new series of the source study.

    Every UID is derived from the source SeriesInstanceUID (the StudyInstanceUID when the
    sources span several series: :func:`analysis_unit`), the model (name, version, sha256),
    the set of source SOP Instance UIDs (:func:`reports.uids.source_set`) and a role: building
    again from the same instances with the same model gives the same UIDs (a retried task), and
    a series that gained an instance, or a new model, gives new ones (a new result, never an
    overwrite of the old one in the PACS).

    ``priority`` (None: no triage finding) is written into the SR as the triage finding;
    ``predecessor`` is the earlier SR this result supersedes (its Study, Series, SOP Class and
    SOP Instance UIDs are read; it must be of the same study and not the SR built here).

    ``groups`` (e.g. one per breast) replace the SR's single series finding group; a group
    without a tracking UID gets one derived like the others (role ``sr-tracking-<n>-<side>``).
    ``frame_numbers[i]`` (1-based) is the frame of a multi-frame ``sources[i]`` that
    ``images[i]`` shows: the SR's image references and the SC's Source Image Sequence name it.
    ``similar_cases`` (nearest past cases of other studies) are listed in the SR.
    ``with_seg`` adds one heatmap Segmentation (FRACTIONAL) per source image that can have one
    (not slides, not multi-frame images: :func:`reports.seg.seg_unsupported`).

    Raises ValueError for inconsistent inputs or a class label or Modality without a code.
    """
    _check_inputs(sources, images, predictions, series_prediction)
    _check_text("manufacturer", manufacturer)
    _check_text("software_version", software_version)
    if priority is not None and not isinstance(priority, bool):
        raise ValueError(f"priority must be True, False or None, not {priority!r}")

    first = sources[0]
    model = (series_prediction.model_name, series_prediction.model_version,
             series_prediction.model_sha256)

    instances = source_set(str(source.SOPInstanceUID) for source in sources)
    unit = analysis_unit(sources)
    several_series = len({str(source.SeriesInstanceUID) for source in sources}) > 1

    def uid(role: str) -> str:
        return derive_uid(unit, *model, instances, role)

    if predecessor is not None:
        _check_predecessor(predecessor, first, uid("sr-instance"))

    if groups is not None:
        for group in groups:
            for index in group.source_indices:
                if not 0 <= index < len(sources):
                    raise ValueError(f"a finding group refers to source {index}, outside "
                                     f"0..{len(sources) - 1}")
            _check_prediction("a finding group's prediction", group.prediction,
                              series_prediction)
        groups = [
            group if group.tracking_uid
            else replace(group, tracking_uid=uid(f"sr-tracking-{n}-{group.laterality or 'U'}"))
            for n, group in enumerate(groups)
        ]
    if frame_numbers is not None:
        if len(frame_numbers) != len(sources):
            raise ValueError(f"{len(frame_numbers)} frame numbers for {len(sources)} sources")
        for source, number in zip(sources, frame_numbers, strict=True):
            frames = positive_int(source.get("NumberOfFrames")) or 1
            if number is not None and not 1 <= number <= frames:
                raise ValueError(f"frame number {number} of {source.SOPInstanceUID} is not in "
                                 f"1..{frames}")

    sr = build_sr(
        sources,
        series_prediction,
        series_instance_uid=uid("sr-series"),
        series_number=_result_series_number(first, SR_SERIES_NUMBER_OFFSET),
        sop_instance_uid=uid("sr-instance"),
        tracking_uid=uid("sr-tracking"),
        device_observer_uid=derive_uid("device-observer", manufacturer,
                                       series_prediction.model_name),
        manufacturer=manufacturer,
        software_version=software_version,
        priority=priority,
        predecessor=predecessor,
        groups=groups,
        frame_numbers=frame_numbers,
        similar_cases=similar_cases,
    )
    sc_series_uid = uid("sc-series")
    sc_series_number = _result_series_number(first, SC_SERIES_NUMBER_OFFSET)
    heatmaps: list[Dataset] = []
    for index, (source, image, prediction) in enumerate(
        zip(sources, images, predictions, strict=True)
    ):
        sc = build_heatmap_sc(
            source,
            image,
            prediction,
            series_instance_uid=sc_series_uid,
            series_number=sc_series_number,
            sop_instance_uid=uid(f"sc-instance-{source.SOPInstanceUID}"),
            instance_number=_instance_number(source, index, several_series),
            manufacturer=manufacturer,
            software_version=software_version,
        )
        number = frame_numbers[index] if frame_numbers is not None else None
        if number is not None:
            # the SC shows this frame of its multi-frame source
            sc.SourceImageSequence[0].ReferencedFrameNumber = int(number)
        heatmaps.append(sc)
    segmentations: list[Dataset] = []
    if with_seg:
        seg_series_uid = uid("seg-series")
        seg_series_number = _result_series_number(first, SEG_SERIES_NUMBER_OFFSET)
        for index, (source, prediction) in enumerate(zip(sources, predictions, strict=True)):
            if seg_unsupported(source) is not None:
                continue  # a slide, a multi-frame image: the SR and SC carry the result
            segmentations.append(build_heatmap_seg(
                source,
                _at_source_size(prediction, source),
                series_instance_uid=seg_series_uid,
                series_number=seg_series_number,
                sop_instance_uid=uid(f"seg-instance-{source.SOPInstanceUID}"),
                instance_number=_instance_number(source, index, several_series),
                manufacturer=manufacturer,
                software_version=software_version,
            ))
    return ResultObjects(sr=sr, heatmaps=heatmaps, segmentations=segmentations)
