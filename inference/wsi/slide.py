"""Reading a VL Whole Slide Microscopy pyramid region by region, never the whole level.

A thin layer over wsidicom: it opens the instances of one series (TILED_FULL or TILED_SPARSE,
any transfer syntax wsidicom can decode: JPEG, JPEG 2000, JPEG-LS through pylibjpeg, RLE, native),
lists the pyramid levels with their pixel spacing, and reads regions as uint8 RGB arrays.
wsidicom's ``level`` argument is log2 of the level's downsample factor (``PyramidLevel.level``);
asking for a level the pyramid does not hold makes wsidicom resample from another one, so only
the levels listed here are ever asked for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np
import numpy.typing as npt
from PIL import Image
from wsidicom import WsiDicom
from wsidicom.errors import (
    WsiDicomError,
    WsiDicomFileError,
    WsiDicomMatchError,
    WsiDicomNoResolutionError,
    WsiDicomNotFoundError,
    WsiDicomNotSupportedError,
    WsiDicomOutOfBoundsError,
    WsiDicomStrictRequirementError,
    WsiDicomUidDuplicateError,
)

VL_WHOLE_SLIDE_MICROSCOPY_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.77.1.6"

# wsidicom's exceptions do not share a base class; these are the ones opening or reading raises
# (plus the decoders' ValueError/RuntimeError and pydicom's KeyError/AttributeError on odd files)
_READ_ERRORS: tuple[type[Exception], ...] = (
    WsiDicomError,
    WsiDicomFileError,
    WsiDicomMatchError,
    WsiDicomNoResolutionError,
    WsiDicomNotFoundError,
    WsiDicomNotSupportedError,
    WsiDicomOutOfBoundsError,
    WsiDicomStrictRequirementError,
    WsiDicomUidDuplicateError,
    OSError,
    ValueError,
    RuntimeError,
    KeyError,
    AttributeError,
)


class SlideError(ValueError):
    """The instances do not make a readable whole-slide pyramid; the message says why."""


@dataclass(frozen=True)
class PyramidLevel:
    """One level of the pyramid: wsidicom's level number, size in pixels, spacing in µm/pixel."""

    level: int
    width: int
    height: int
    mpp: float

    @property
    def downsample(self) -> int:
        return 1 << self.level


def _to_rgb(array: npt.NDArray[np.generic]) -> npt.NDArray[np.uint8]:
    """A region as wsidicom returns it -> (H, W, 3) uint8."""
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    elif array.ndim == 3 and array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, :3]
    if array.ndim != 3 or array.shape[2] != 3:
        raise SlideError(f"unexpected region shape {array.shape} (expected H x W x 3)")
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.integer) and array.dtype.itemsize > 1:
            top = float(max(int(array.max()), 1))
            array = np.clip(array.astype(np.float32) * (255.0 / top), 0, 255)
        array = np.asarray(array).astype(np.uint8)
    return np.ascontiguousarray(array, dtype=np.uint8)


class WholeSlide:
    """An open pyramid (use as a context manager, or call ``close``)."""

    def __init__(self, wsi: WsiDicom) -> None:
        self._wsi = wsi
        levels: list[PyramidLevel] = []
        for level in wsi.levels:
            mpp = level.mpp
            if mpp is None or not (mpp.width > 0 and mpp.height > 0):
                raise SlideError(f"pyramid level {level.level} has no pixel spacing")
            levels.append(
                PyramidLevel(
                    level=int(level.level),
                    width=int(level.size.width),
                    height=int(level.size.height),
                    mpp=float((mpp.width + mpp.height) / 2.0),
                )
            )
        if not levels:
            raise SlideError("the series holds no pyramid level")
        self.levels: tuple[PyramidLevel, ...] = tuple(sorted(levels, key=lambda lv: lv.level))

    @classmethod
    def open(cls, paths: Sequence[Path]) -> WholeSlide:
        """Open the VL Whole Slide Microscopy instances among ``paths`` (other files ignored).

        Raises ``SlideError`` when they do not make a pyramid wsidicom can read.
        """
        if not paths:
            raise SlideError("no instances to open")
        try:
            wsi = WsiDicom.open([Path(p) for p in paths])
        except _READ_ERRORS as exc:
            raise SlideError(f"cannot open the whole-slide pyramid: {exc}") from exc
        try:
            return cls(wsi)
        except SlideError:
            wsi.close()
            raise

    def close(self) -> None:
        self._wsi.close()

    def __enter__(self) -> WholeSlide:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def base(self) -> PyramidLevel:
        return self.levels[0]

    def level_for_spacing(self, mpp: float, tolerance: float = 1.25) -> PyramidLevel:
        """The coarsest level at least as fine as ``mpp`` (µm/pixel), allowing ``tolerance``.

        A level up to ``tolerance`` times coarser than asked counts as fine enough (a 4.4 µm
        level for 4 µm tiles). Raises ``SlideError`` when even the base level is coarser.
        """
        usable = [lv for lv in self.levels if lv.mpp <= mpp * tolerance]
        if not usable:
            raise SlideError(
                f"the slide's finest level has {self.base.mpp:.3g} µm/pixel, coarser than the "
                f"{mpp:.3g} µm/pixel the patch model needs"
            )
        return max(usable, key=lambda lv: lv.mpp)

    def level_at_most(self, mpp: float) -> PyramidLevel:
        """The coarsest level whose spacing is at most ``mpp`` (the base level if none is)."""
        usable = [lv for lv in self.levels if lv.mpp <= mpp]
        return max(usable, key=lambda lv: lv.mpp) if usable else self.base

    def read(
        self, level: PyramidLevel, x: int, y: int, width: int, height: int
    ) -> npt.NDArray[np.uint8]:
        """The region (x, y, width, height) of ``level`` as (height, width, 3) uint8 RGB.

        The part of the region outside the level is white.
        """
        if width <= 0 or height <= 0:
            raise ValueError(f"empty region {width}x{height}")
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, level.width), min(y + height, level.height)
        if x1 <= x0 or y1 <= y0:
            return out
        try:
            region = self._wsi.read_region(
                (x0, y0), level.level, (x1 - x0, y1 - y0), as_array=True
            )
        except _READ_ERRORS as exc:
            raise SlideError(
                f"cannot decode region ({x0}, {y0}) {x1 - x0}x{y1 - y0} of level {level.level}: "
                f"{exc}"
            ) from exc
        out[y0 - y : y1 - y, x0 - x : x1 - x] = _to_rgb(np.asarray(region))
        return out

    def downsampled(
        self, mpp: float, block: int = 2048
    ) -> tuple[npt.NDArray[np.uint8], float]:
        """The whole slide at about ``mpp`` µm/pixel, read block by block.

        Reads the coarsest level at least as fine as ``mpp`` in ``block`` x ``block`` regions,
        shrinking each, so memory stays bounded by the output plus one block. Returns the image
        and its actual spacing (µm/pixel).
        """
        source = self.level_at_most(mpp)
        factor = max(mpp / source.mpp, 1.0)
        out_w = max(1, math.ceil(source.width / factor))
        out_h = max(1, math.ceil(source.height / factor))
        out = np.full((out_h, out_w, 3), 255, dtype=np.uint8)
        # blocks aligned so each maps onto whole output pixels
        step = max(1, int(block // factor)) * factor
        y = 0.0
        while y < source.height:
            x = 0.0
            while x < source.width:
                sx, sy = int(round(x)), int(round(y))
                sw = min(int(round(x + step)), source.width) - sx
                sh = min(int(round(y + step)), source.height) - sy
                ox, oy = int(round(x / factor)), int(round(y / factor))
                ow = max(1, min(int(round((x + step) / factor)), out_w) - ox)
                oh = max(1, min(int(round((y + step) / factor)), out_h) - oy)
                if sw > 0 and sh > 0 and ox < out_w and oy < out_h:
                    region = self.read(source, sx, sy, sw, sh)
                    if (ow, oh) != (sw, sh):
                        region = np.asarray(
                            Image.fromarray(region).resize((ow, oh), Image.Resampling.BOX)
                        )
                    out[oy : oy + oh, ox : ox + ow] = region[: out_h - oy, : out_w - ox]
                x += step
            y += step
        # the last row and column may be partial pixels; the spacing is the scale used
        return out, source.mpp * factor
