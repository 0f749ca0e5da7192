"""The whole-slide (SM) pipeline of a worker: a stored pyramid in, one slide finding out.

The instances of a VL Whole Slide Microscopy series are opened from the instance store by
wsidicom (``inference.wsi``), analysed region by region, and turned into what the result objects
need: the source instance (the pyramid level the tiles were read from), the display image (the
slide thumbnail), and the slide prediction whose heatmap is the tile-probability map at the
thumbnail's size and whose ``extra`` carries the slide measurements (``reports.slide``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from inference import Classifier, Prediction
from inference.wsi.aggregator import SlideAggregator, load_aggregator
from inference.wsi.analysis import (
    ANALYSIS_MPP,
    TILE_PIXELS,
    TILE_UM,
    SlideAnalysis,
    analyse_slide,
)
from inference.wsi.slide import VL_WHOLE_SLIDE_MICROSCOPY_IMAGE_STORAGE, SlideError, WholeSlide
from reports.slide import slide_extra

log = logging.getLogger(__name__)


class SlidePipelineError(ValueError):
    """The slide cannot be analysed; the message says why (it becomes the job's reason)."""


@dataclass(frozen=True)
class SlideResult:
    """One analysed slide: the instance, image and prediction the SR and SC are made of."""

    source: Dataset
    image: np.ndarray
    prediction: Prediction
    analysis: SlideAnalysis
    details: dict[str, object] = field(default_factory=dict)


def _paths(datasets: Sequence[Dataset]) -> list[Path]:
    paths: list[Path] = []
    for ds in datasets:
        if str(ds.get("SOPClassUID", "")) != VL_WHOLE_SLIDE_MICROSCOPY_IMAGE_STORAGE:
            continue
        filename = getattr(ds, "filename", None)
        if not isinstance(filename, str | Path) or not Path(filename).is_file():
            raise SlidePipelineError(
                f"instance {ds.get('SOPInstanceUID')} was not read from a file: wsidicom opens "
                "the pyramid from the instance store"
            )
        paths.append(Path(filename))
    if not paths:
        classes = sorted({str(ds.get("SOPClassUID")) for ds in datasets})
        raise SlidePipelineError(
            "no VL Whole Slide Microscopy Image instance in the series (SOP classes: "
            f"{', '.join(classes)})"
        )
    return paths


def _source_of_level(datasets: Sequence[Dataset], width: int, height: int) -> Dataset:
    """The instance of the pyramid level of that size (the one the tiles came from)."""
    candidates = [
        ds
        for ds in datasets
        if str(ds.get("SOPClassUID", "")) == VL_WHOLE_SLIDE_MICROSCOPY_IMAGE_STORAGE
        and int(ds.get("TotalPixelMatrixColumns") or 0) == width
        and int(ds.get("TotalPixelMatrixRows") or 0) == height
    ]
    if not candidates:
        raise SlidePipelineError(f"no instance holds the {width}x{height} level")
    return min(candidates, key=lambda ds: int(ds.get("InstanceNumber") or 0))


def slide_prediction(analysis: SlideAnalysis, classifier: Classifier) -> Prediction:
    """The slide finding as a Prediction (tile map as heatmap, measurements in ``extra``)."""
    card = classifier.card
    probabilities = dict(analysis.slide_probabilities)
    label = max(analysis.labels, key=lambda name: probabilities[name])
    version = card.version
    if analysis.aggregator_version:
        # another aggregator with the same patch model is another result (new UIDs)
        version = f"{card.version}+agg{analysis.aggregator_version}"
    tiling = (
        f"{TILE_UM:.0f} µm tiles at {ANALYSIS_MPP:g} µm/pixel ({TILE_PIXELS} px) from pyramid "
        f"level {analysis.level.level} ({analysis.level.mpp:.3g} µm/pixel); tumour-positive at "
        f"p({analysis.positive_label}) >= {analysis.threshold:g}"
    )
    return Prediction(
        modality="SM",
        label=label,
        labels=analysis.labels,
        probabilities=probabilities,
        model_name=card.name,
        model_version=version,
        model_sha256=card.sha256,
        heatmap=analysis.heatmap(),
        embedding=analysis.embedding,
        not_assessable=analysis.tissue_tiles == 0,
        extra={
            "heatmap": f"probability of '{analysis.positive_label}' per {TILE_UM:.0f} µm tile",
            **slide_extra(
                tissue_area_mm2=analysis.tissue_area_mm2,
                tumour_area_mm2=analysis.positive_area_mm2,
                tumour_fraction=analysis.positive_fraction,
                tissue_tiles=analysis.tissue_tiles,
                tumour_tiles=analysis.positive_tiles,
                aggregator=analysis.aggregator,
                tiling=tiling,
            ),
        },
    )


def analyse_slide_series(
    datasets: Sequence[Dataset],
    classifier: Classifier,
    aggregator: SlideAggregator | None = None,
    *,
    use_bundled_aggregator: bool = True,
    threshold: float = 0.5,
    max_tiles: int | None = None,
) -> SlideResult:
    """Analyse the pyramid of one SM series (datasets read from the instance store).

    The aggregator is ``aggregator``, else the bundled one trained on ``classifier`` (when
    ``use_bundled_aggregator``), else the pipeline's documented non-learned rule. Raises
    ``SlidePipelineError`` with the reason when the slide cannot be analysed.
    """
    paths = _paths(datasets)
    if aggregator is None and use_bundled_aggregator:
        aggregator = load_aggregator(classifier.card)
    try:
        with WholeSlide.open(paths) as slide:
            analysis = analyse_slide(
                slide, classifier, aggregator, threshold=threshold, max_tiles=max_tiles
            )
    except SlideError as exc:
        raise SlidePipelineError(str(exc)) from exc
    source = _source_of_level(datasets, analysis.level.width, analysis.level.height)
    prediction = slide_prediction(analysis, classifier)
    tiles = analysis.tissue_tiles
    details: dict[str, object] = {
        "pyramid_level": analysis.level.level,
        "level_mpp": round(analysis.level.mpp, 4),
        "tile_um": analysis.tile_um,
        "tissue_tiles": tiles,
        "tumour_tiles": analysis.positive_tiles,
        "tumour_fraction": round(analysis.positive_fraction, 4),
        "tissue_area_mm2": round(analysis.tissue_area_mm2, 3),
        "tumour_area_mm2": round(analysis.positive_area_mm2, 3),
        "aggregator": analysis.aggregator,
        "seconds": round(analysis.seconds, 2),
        "tiles_per_second": round(tiles / analysis.seconds, 1) if analysis.seconds > 0 else None,
    }
    log.info(
        "slide %s: %d tissue tiles, %d tumour-positive, p(%s)=%.3f in %.1f s",
        source.get("SeriesInstanceUID"),
        tiles,
        analysis.positive_tiles,
        analysis.positive_label,
        prediction.probabilities[analysis.positive_label],
        analysis.seconds,
    )
    return SlideResult(
        source=source,
        image=analysis.thumbnail,
        prediction=prediction,
        analysis=analysis,
        details=details,
    )
