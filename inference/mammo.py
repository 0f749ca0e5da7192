"""Mammogram geometry: which side the chest wall is on, and where the breast is.

The MG model sees every breast the same way: chest wall on the LEFT of the image, cropped to the
breast region. ``orient_to_left`` flips by the DICOM laterality (ImageLaterality/Laterality: a
right breast's image has its chest wall on the right in the standard hanging), or, without
laterality, by content (the chest wall is the brighter side). ``breast_region`` does orientation
by content and the crop, so the classifier needs no DICOM attributes; the node may still flip by
laterality first (orientation by content is then a no-op) and must un-flip the heatmap.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy import ndimage

Box = tuple[int, int, int, int]


def _grey(image: np.ndarray) -> npt.NDArray[np.float32]:
    array = np.asarray(image)
    if array.ndim == 3:
        array = array[..., :3].astype(np.float32).mean(axis=2)
    if array.ndim != 2:
        raise ValueError(f"expected an image of shape (H, W) or (H, W, 3), got {array.shape}")
    return array.astype(np.float32)


def chest_wall_on_right(image: np.ndarray) -> bool:
    """True when the breast (and so the chest wall) sits on the right half of the image."""
    grey = _grey(image)
    half = grey.shape[1] // 2
    return float(grey[:, half:].mean()) > float(grey[:, :half].mean())


def orient_to_left(image: np.ndarray, laterality: str | None = None) -> np.ndarray:
    """The image with the chest wall on the left: flipped left-right when ``laterality`` is "R"
    (standard display of a right breast), or, without laterality, when the content says so."""
    side = (laterality or "").strip().upper()
    if side == "R":
        flip = True
    elif side == "L":
        flip = False
    else:
        flip = chest_wall_on_right(image)
    return np.ascontiguousarray(image[:, ::-1]) if flip else image


def breast_bbox(image: np.ndarray, margin: float = 0.02) -> Box:
    """(top, left, bottom, right) of the breast: the largest bright connected region after an
    Otsu-like threshold, which drops film labels and scanner text; the whole image if none."""
    grey = _grey(image)
    height, width = grey.shape
    small = grey[:: max(1, height // 256), :: max(1, width // 256)]
    threshold = _otsu(small)
    mask = small > max(threshold * 0.5, float(np.percentile(small, 5)) + 1.0)
    labelled, count = ndimage.label(mask)
    if count == 0:
        return 0, 0, height, width
    sizes = ndimage.sum(mask, labelled, index=np.arange(1, count + 1))
    largest = labelled == (int(np.argmax(sizes)) + 1)
    rows = np.flatnonzero(largest.any(axis=1))
    cols = np.flatnonzero(largest.any(axis=0))
    scale_y, scale_x = height / small.shape[0], width / small.shape[1]
    pad_y, pad_x = int(margin * height), int(margin * width)
    top = max(0, int(rows[0] * scale_y) - pad_y)
    bottom = min(height, int((rows[-1] + 1) * scale_y) + pad_y)
    left = max(0, int(cols[0] * scale_x) - pad_x)
    right = min(width, int((cols[-1] + 1) * scale_x) + pad_x)
    if bottom - top < 8 or right - left < 8:
        return 0, 0, height, width
    return top, left, bottom, right


def breast_region(image: np.ndarray) -> np.ndarray:
    """Orient by content (chest wall left) and crop to the breast."""
    oriented = orient_to_left(image)
    top, left, bottom, right = breast_bbox(oriented)
    return np.ascontiguousarray(oriented[top:bottom, left:right])


def _otsu(values: np.ndarray) -> float:
    histogram, edges = np.histogram(values, bins=256)
    centres = (edges[:-1] + edges[1:]) / 2
    weight1 = np.cumsum(histogram)
    weight2 = weight1[-1] - weight1
    mean1 = np.cumsum(histogram * centres) / np.maximum(weight1, 1)
    total = (histogram * centres).sum()
    mean2 = (total - np.cumsum(histogram * centres)) / np.maximum(weight2, 1)
    between = weight1 * weight2 * (mean1 - mean2) ** 2
    return float(centres[int(np.argmax(between))])
