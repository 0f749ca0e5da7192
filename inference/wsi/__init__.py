"""Whole-slide microscopy (SM): pyramids read region by region, tissue, tiles, slide result.

Public API: ``WholeSlide`` (open a VL Whole Slide Microscopy series with wsidicom),
``analyse_slide`` -> ``SlideAnalysis`` (tile-probability map, tumour fraction and area, slide
probability), ``load_aggregator`` (the bundled attention-pooling aggregator of a patch model),
``SlideError``.
"""

from inference.wsi.aggregator import SlideAggregator, load_aggregator
from inference.wsi.analysis import ANALYSIS_MPP, TILE_UM, SlideAnalysis, analyse_slide
from inference.wsi.slide import SlideError, WholeSlide

__all__ = [
    "ANALYSIS_MPP",
    "TILE_UM",
    "SlideAggregator",
    "SlideAnalysis",
    "SlideError",
    "WholeSlide",
    "analyse_slide",
    "load_aggregator",
]
