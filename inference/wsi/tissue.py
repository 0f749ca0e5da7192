"""Tissue detection on a low-resolution image of the slide: Otsu's threshold on saturation.

H&E tissue is pink/purple (saturated); glass and the white background of a scan are grey or
white (unsaturated). Very dark pixels (scanner padding, pen marks on black) are not tissue either.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

# Otsu's threshold is clamped to [MIN_SATURATION, MAX_SATURATION]. Below the minimum nothing is
# tissue, whatever Otsu says (an empty slide's threshold would otherwise split the background's
# noise in two); above the maximum, pale tissue (fat, loose stroma: mean saturation 0.08-0.14 in
# IDC patches) would be lost to a slide whose tissue is mostly dark, saturated tumour. Glass
# averaged over 50 µm pixels stays below 0.04.
MIN_SATURATION = 0.05
MAX_SATURATION = 0.09
# Pixels darker than this (max of R, G, B) are padding or ink, not stained tissue.
MIN_BRIGHTNESS = 30


def saturation(rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """HSV saturation (max - min) / max of an (H, W, 3) uint8 image, in [0, 1]."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got {rgb.shape}")
    high = rgb.max(axis=2).astype(np.float32)
    low = rgb.min(axis=2).astype(np.float32)
    return np.where(high > 0, (high - low) / np.maximum(high, 1.0), 0.0).astype(np.float32)


def otsu_threshold(values: npt.NDArray[np.floating], bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1] (maximises the between-class variance)."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    if flat.size == 0:
        raise ValueError("no values to threshold")
    histogram, edges = np.histogram(flat, bins=bins, range=(0.0, 1.0))
    weights = histogram.astype(np.float64)
    centres = (edges[:-1] + edges[1:]) / 2.0
    below = np.cumsum(weights)
    above = below[-1] - below
    sum_below = np.cumsum(weights * centres)
    mean_below = np.divide(sum_below, below, out=np.zeros_like(sum_below), where=below > 0)
    mean_above = np.divide(
        sum_below[-1] - sum_below, above, out=np.zeros_like(sum_below), where=above > 0
    )
    between = below * above * (mean_below - mean_above) ** 2
    # two separated populations give a plateau of equal maxima (any cut in the gap): take its
    # middle, not its first bin
    best = np.flatnonzero(between >= between.max() * (1.0 - 1e-9))
    return float(edges[int(round((best[0] + best[-1]) / 2)) + 1])


def tissue_mask(rgb: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.bool_], float]:
    """Boolean tissue mask of a low-resolution RGB image and the saturation threshold used."""
    sat = saturation(rgb)
    bright = rgb.max(axis=2) >= MIN_BRIGHTNESS
    candidates = sat[bright]
    threshold = MIN_SATURATION
    if candidates.size:
        threshold = min(max(otsu_threshold(candidates), MIN_SATURATION), MAX_SATURATION)
    return (sat > threshold) & bright, threshold
