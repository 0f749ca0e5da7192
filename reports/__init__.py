"""DICOM result objects built from source datasets and predictions.

Public API: :func:`build_results` (TID 1500 SR + heatmap SCs of one series), :class:`ResultObjects`,
:func:`derive_uid`, :func:`render_overlay` and :func:`overlay_png`.
"""

from reports.overlay import overlay_png, render_overlay
from reports.results import ResultObjects, build_results
from reports.uids import derive_uid

__all__ = ["ResultObjects", "build_results", "derive_uid", "overlay_png", "render_overlay"]
