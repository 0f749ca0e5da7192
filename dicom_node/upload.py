"""The upload page (``GET /upload``) and its backend (``POST /analyse``).

A DICOM file goes through the normal pipeline: it is stored with the STOW-RS rules
(``DicomwebService.store_instance``), its series completes after ``series_quiet_seconds`` and is
analysed by a worker; the page polls ``/studies/{StudyInstanceUID}`` until the result exists. A
plain image (PNG, JPEG, TIFF) is analysed at once with ``inference.load_bundled(modality)`` and
nothing is kept: no study, no result row, no file (the response says so).
"""

from __future__ import annotations

import base64
import io
import tempfile
import threading
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from PIL import Image, UnidentifiedImageError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from dicom_node.dicomweb import DicomwebService
from dicom_node.settings import Settings
from inference import Classifier, ModelNotAvailableError, Prediction, image_from_file, load_bundled
from reports import overlay_png

STATIC = Path(__file__).resolve().parent / "static"
#: the page's own files, served under /upload/
PAGE_FILES = {
    "upload.js": "text/javascript",
    "upload.css": "text/css",
}
#: modalities a plain image can be (it does not say); DICOM files say theirs
MODALITIES = {"US": "ultrasound", "MG": "mammogram", "SM": "histopathology patch"}
IMAGE_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "TIFF": ".tif"}
#: multipart headers and the modality field on top of the file itself
_FORM_OVERHEAD = 64 * 1024


class _Models:
    """Bundled classifiers loaded on first use; one prediction at a time (2 cores, Grad-CAM
    hooks are per model)."""

    def __init__(self) -> None:
        self._models: dict[str, Classifier] = {}
        self._lock = threading.Lock()

    def predict(self, modality: str, image_path: Path) -> tuple[Prediction, bytes]:
        with self._lock:
            if modality not in self._models:
                self._models[modality] = load_bundled(modality)
            image = image_from_file(image_path)
            prediction = self._models[modality].predict(image)
            return prediction, overlay_png(image, prediction)


def _too_large(size: int, limit: int) -> HTTPException:
    return HTTPException(
        413,
        f"the file is {size:,} bytes; the upload limit is {limit:,} bytes "
        "(setting upload_max_bytes)",
    )


def upload_router(settings: Settings, dicomweb: DicomwebService) -> APIRouter:
    """``GET /upload`` (+ its script and style) and ``POST /analyse``."""
    router = APIRouter(tags=["upload"])
    models = _Models()
    limit = settings.upload_max_bytes

    @router.get("/upload", response_class=FileResponse)
    def page() -> FileResponse:
        """The upload page: drop or pick images, see the model's finding."""
        return FileResponse(STATIC / "upload.html", media_type="text/html")

    @router.get("/upload/{name}", response_class=FileResponse)
    def page_file(name: str) -> FileResponse:
        if name not in PAGE_FILES:
            raise HTTPException(404, f"no page file {name!r}")
        return FileResponse(STATIC / name, media_type=PAGE_FILES[name])

    @router.post("/analyse")
    async def analyse(request: Request) -> JSONResponse:
        """Analyse one uploaded file (multipart form: ``file``, and ``modality`` for a plain
        image). DICOM: stored and analysed by the pipeline (202, poll ``study_url``). PNG, JPEG,
        TIFF: analysed now and not stored (200)."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit + _FORM_OVERHEAD:
            raise _too_large(int(declared), limit)
        try:
            form = await request.form(max_files=1, max_fields=4)
        except MultiPartException as exc:
            raise HTTPException(400, f"not a multipart form upload: {exc.message}") from exc
        try:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise HTTPException(422, "no file in the form (field 'file')")
            data = await upload.read(limit + 1)
            if len(data) > limit:
                raise _too_large(upload.size or len(data), limit)
            if not data:
                raise HTTPException(422, f"{upload.filename or 'the file'} is empty")
            raw_modality = form.get("modality")
            modality = raw_modality.strip().upper() if isinstance(raw_modality, str) else ""
            name = upload.filename or "upload"
        finally:
            await form.close()
        if len(data) >= 132 and data[128:132] == b"DICM":
            return await run_in_threadpool(_store_dicom, dicomweb, data, name)
        return await run_in_threadpool(_analyse_image, models, data, name, modality, settings)

    return router


def _store_dicom(dicomweb: DicomwebService, data: bytes, name: str) -> JSONResponse:
    outcome = dicomweb.store_instance(data, None)
    if not outcome.stored:
        raise HTTPException(
            422,
            f"{name} was not stored: {outcome.reason} (DICOM status 0x{outcome.failure:04X})",
        )
    body: dict[str, Any] = {
        "kind": "dicom",
        "file": name,
        "stored": True,
        "duplicate": outcome.duplicate,
        "study_instance_uid": outcome.study_instance_uid,
        "series_instance_uid": outcome.series_instance_uid,
        "sop_instance_uid": outcome.sop_instance_uid,
        "study_url": f"/studies/{outcome.study_instance_uid}",
        "message": (
            "stored as a study: it is analysed by the normal pipeline once its series is "
            "complete, and gets its SR and heatmap SC"
        ),
    }
    return JSONResponse(body, status_code=202)


def _analyse_image(
    models: _Models, data: bytes, name: str, modality: str, settings: Settings
) -> JSONResponse:
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = image.format or ""
            width, height = image.size
    except UnidentifiedImageError as exc:
        raise HTTPException(
            415, f"{name} is not a PNG, JPEG, TIFF or DICOM file that can be read"
        ) from exc
    except Image.DecompressionBombError as exc:
        raise HTTPException(413, f"{name} has too many pixels to open safely") from exc
    if kind not in IMAGE_FORMATS:
        raise HTTPException(415, f"{name} is a {kind or 'unknown'} image; PNG, JPEG or TIFF only")
    if width * height > settings.max_frame_pixels:
        raise HTTPException(
            413, f"{name} is {width}x{height}: more pixels than max_frame_pixels allows"
        )
    if not modality:
        raise HTTPException(
            422,
            f"{name} does not say its modality: choose one of "
            + ", ".join(f"{code} ({what})" for code, what in MODALITIES.items()),
        )
    if modality not in MODALITIES:
        raise HTTPException(422, f"unknown modality {modality!r}; one of {', '.join(MODALITIES)}")
    with tempfile.TemporaryDirectory(prefix="breastcad-upload-") as folder:
        path = Path(folder) / f"image{IMAGE_FORMATS[kind]}"
        path.write_bytes(data)
        try:
            prediction, overlay = models.predict(modality, path)
        except ModelNotAvailableError as exc:
            raise HTTPException(422, str(exc)) from exc
        except ValueError as exc:
            raise HTTPException(422, f"{name} cannot be decoded: {exc}") from exc
    body: dict[str, Any] = {
        "kind": "image",
        "file": name,
        "stored": False,
        "message": "analysed without storing a study: nothing of this image was kept",
        "modality": modality,
        "label": prediction.label,
        "probability": prediction.probability,
        "probabilities": {k: float(v) for k, v in prediction.probabilities.items()},
        "not_assessable": prediction.not_assessable,
        "ood_score": prediction.ood_score,
        "model": {
            "name": prediction.model_name,
            "version": prediction.model_version,
            "sha256": prediction.model_sha256,
        },
        "heatmap": "data:image/png;base64," + base64.b64encode(overlay).decode("ascii"),
        "similar": None,
    }
    return JSONResponse(body)
