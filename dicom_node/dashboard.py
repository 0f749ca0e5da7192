"""The dashboard: a page served by the API (``/``), plain HTML + JS + CSS from ``static/``.

No build step and no CDN: the page is ``static/index.html`` with ``dashboard.js`` and
``dashboard.css`` next to it, and it reads the same JSON API as everyone else (``/worklist``,
``/studies/{uid}``, ``/results/{id}/similar``, ``/jobs``, ``/deliveries/{id}/retry``). Polling
that API every few seconds is the live job progress.

This module also serves a PNG of a stored source instance (``/instances/{uid}/image.png``), which
the study page shows beside the heatmap.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import FileResponse, Response
from PIL import Image
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from dicom_node.db import Instance, StateDB
from dicom_node.settings import Settings

STATIC_DIR = Path(__file__).resolve().parent / "static"
# what static/ may serve: plain files of these kinds, by name (no sub-folders, no dot-files)
_MEDIA_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
_STATIC_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def dashboard_router(settings: Settings, db: StateDB) -> APIRouter:
    """The routes of the dashboard page and the source-image PNG endpoint."""
    router = APIRouter()

    @router.get("/", response_class=FileResponse, include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8")

    @router.get("/static/{name}", response_class=FileResponse, include_in_schema=False)
    def static_file(name: str) -> FileResponse:
        path = STATIC_DIR / name
        media_type = _MEDIA_TYPES.get(path.suffix)
        if not _STATIC_NAME.match(name) or media_type is None or not path.is_file():
            raise HTTPException(404, f"no static file {name!r}")
        return FileResponse(path, media_type=media_type)

    @router.get(
        "/instances/{sop_instance_uid}/image.png",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}},
    )
    def instance_image(
        sop_instance_uid: str,
        frame: int = Query(1, ge=1, description="1-based frame number"),
        size: int = Query(1024, ge=16, le=4096, description="longest side in pixels, at most"),
    ) -> Response:
        """A stored source instance rendered as a PNG (display pixels, first frame by default)."""
        # imported here: the inference package loads torch, which the API needs only for this
        from inference.dicom_pixels import image_from_dataset

        with db.session() as session:
            row = session.get(Instance, sop_instance_uid)
        if row is None:
            raise HTTPException(404, f"no stored instance {sop_instance_uid}")
        path = settings.store_dir / row.path
        try:
            ds = dcmread(path)
        except FileNotFoundError as exc:
            raise HTTPException(410, f"the file of instance {sop_instance_uid} is gone") from exc
        except (OSError, InvalidDicomError) as exc:
            raise HTTPException(422, f"instance {sop_instance_uid} cannot be read: {exc}") from exc
        try:
            pixels = image_from_dataset(ds, frame=frame - 1)
        except ValueError as exc:
            raise HTTPException(422, f"instance {sop_instance_uid}: {exc}") from exc
        image = Image.fromarray(pixels)
        image.thumbnail((size, size))
        return Response(_png(image), media_type="image/png")

    return router
