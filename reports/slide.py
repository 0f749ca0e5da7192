"""The slide-level result of a whole-slide (SM) analysis, as facts a Prediction can carry.

``reports`` may only take the ``Prediction`` type from ``inference``, so the slide facts travel in
``Prediction.extra`` under the ``slide.*`` keys written by :func:`slide_extra`;
:func:`slide_measurements` turns them into TID 1501 measurements of the SR's finding group:

- area of the tissue analysed and of the tumour-positive tissue (mm2),
- fraction of the tissue that is tumour-positive (%),
- number of tissue tiles analysed and of tumour-positive tiles ({tiles}),

all with private ``99BCAD`` concepts (no standard code says "area of the tiles a model called
tumour"). The algorithm that pooled the tiles and the tiling are in ``slide.aggregator`` and
``slide.tiling`` (free text in the SC's Derivation Description).
"""

from __future__ import annotations

from collections.abc import Mapping

import highdicom as hd
from pydicom.sr.coding import Code

from inference.prediction import Prediction
from reports.codes import PRIVATE_SCHEME_DESIGNATOR

TISSUE_AREA = Code("SLTISSAREA", PRIVATE_SCHEME_DESIGNATOR, "Area of tissue analysed")
TUMOUR_AREA = Code("SLTUMAREA", PRIVATE_SCHEME_DESIGNATOR, "Area of tumour-positive tissue")
TUMOUR_FRACTION = Code(
    "SLTUMFRAC", PRIVATE_SCHEME_DESIGNATOR, "Fraction of tissue tumour-positive"
)
TISSUE_TILES = Code("SLTISSTILES", PRIVATE_SCHEME_DESIGNATOR, "Number of tissue tiles analysed")
TUMOUR_TILES = Code("SLTUMTILES", PRIVATE_SCHEME_DESIGNATOR, "Number of tumour-positive tiles")

SQUARE_MM = Code("mm2", "UCUM", "square millimeter")
PERCENT = Code("%", "UCUM", "percent")
TILES = Code("{tiles}", "UCUM", "tiles")

KEYS = (
    "slide.tissue_area_mm2",
    "slide.tumour_area_mm2",
    "slide.tumour_fraction_percent",
    "slide.tissue_tiles",
    "slide.tumour_tiles",
)
_MEASURES: tuple[tuple[str, Code, Code], ...] = (
    ("slide.tissue_area_mm2", TISSUE_AREA, SQUARE_MM),
    ("slide.tumour_area_mm2", TUMOUR_AREA, SQUARE_MM),
    ("slide.tumour_fraction_percent", TUMOUR_FRACTION, PERCENT),
    ("slide.tissue_tiles", TISSUE_TILES, TILES),
    ("slide.tumour_tiles", TUMOUR_TILES, TILES),
)


def slide_extra(
    *,
    tissue_area_mm2: float,
    tumour_area_mm2: float,
    tumour_fraction: float,
    tissue_tiles: int,
    tumour_tiles: int,
    aggregator: str,
    tiling: str,
) -> dict[str, str]:
    """The ``Prediction.extra`` entries of a slide result (``tumour_fraction`` in [0, 1])."""
    values = {
        "slide.tissue_area_mm2": float(tissue_area_mm2),
        "slide.tumour_area_mm2": float(tumour_area_mm2),
        "slide.tumour_fraction_percent": 100.0 * float(tumour_fraction),
        "slide.tissue_tiles": float(tissue_tiles),
        "slide.tumour_tiles": float(tumour_tiles),
    }
    for key, value in values.items():
        if not value >= 0.0:
            raise ValueError(f"{key} must be a non-negative number, got {value}")
    if values["slide.tumour_fraction_percent"] > 100.0 + 1e-9:
        raise ValueError(f"tumour fraction {tumour_fraction} is more than 1")
    if tumour_area_mm2 > tissue_area_mm2 + 1e-9 or tumour_tiles > tissue_tiles:
        raise ValueError("more tumour than tissue")
    extra = {key: f"{value:.6g}" for key, value in values.items()}
    extra["slide.aggregator"] = aggregator
    extra["slide.tiling"] = tiling
    return extra


def is_slide_result(extra: Mapping[str, str]) -> bool:
    return all(key in extra for key in KEYS)


def slide_measurements(prediction: Prediction) -> list[hd.sr.Measurement]:
    """The slide measurements of a prediction made by the SM pipeline; [] for any other."""
    if not is_slide_result(prediction.extra):
        return []
    measurements: list[hd.sr.Measurement] = []
    for key, name, unit in _MEASURES:
        try:
            value = float(prediction.extra[key])
        except ValueError as exc:
            raise ValueError(f"slide result {key} is not a number: {exc}") from exc
        measurements.append(hd.sr.Measurement(name=name, value=value, unit=unit))
    return measurements
