"""Rendered study images for the viewer, and their window presets.

The picture is rendered on the server from the stored DICOM through the model's
pixel pipeline (``xray_triage.pipeline.render``), so a station on a slow link
downloads a ~100 KB JPEG instead of a multi-megabyte DICOM, and the specialist sees
exactly what the model saw. Routes are plain ``def``: FastAPI runs them in its
thread pool, which is what CPU-bound decoding needs.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import Response

from consult_web import schemas
from consult_web.access import visible_instance
from consult_web.deps import AppSettings, CurrentUser, Db
from consult_web.errors import LocalizedError
from xray_triage.pipeline.pixels import PixelError
from xray_triage.pipeline.render import (
    DEFAULT_SIZE,
    MIN_SIZE,
    PRESETS,
    LoadedImage,
    RenderError,
    image_cache,
    render,
    windows_info,
)
from xray_triage.settings import Settings
from xray_triage.store.db import Database
from xray_triage.store.reasons import image_label, user_reason
from xray_triage.store.users import AuthUser

log = logging.getLogger(__name__)
router = APIRouter()  # the pictures (for <img>; not JSON)
api_router = APIRouter(prefix="/api", tags=["images"])

# Rendered pictures never change for given parameters (stored files are immutable), but
# they are patient data: the browser may keep them, shared caches may not.
CACHE_CONTROL = "private, max-age=3600"


def _load(
    db: Database, settings: Settings, user: AuthUser, study_uid: str, sop_uid: str, size: int
) -> LoadedImage:
    """The decoded image, good for pictures up to ``size`` px, if the user may see it.

    404 when the user may not, 422 when it cannot be decoded. The read session ends before
    the decode starts (a slow decode holds no database connection).
    """
    with db.read_session() as session:
        _study, instance = visible_instance(session, user, study_uid, sop_uid)
        file_path = instance.file_path
    label = image_label(sop_uid)
    try:
        return image_cache(settings.render_cache_images, settings.max_frame_pixels).get(
            Path(settings.data_dir) / file_path, source=label, size=size
        )
    except PixelError as exc:
        log.warning("cannot render image", extra={"sop_uid": sop_uid, "file": file_path, "error": str(exc)})
        error = user_reason(str(exc), file_path=file_path, label=label, data_dir=settings.data_dir)
        raise LocalizedError(422, f"usererror.image_{exc.kind}", error=error) from exc


@router.get("/studies/{study_uid}/images/{sop_uid}/render")
def render_image(
    study_uid: str,
    sop_uid: str,
    wc: float | None = Query(None, description="window centre, Modality-LUT units"),
    ww: float | None = Query(None, description="window width, Modality-LUT units"),
    preset: str | None = Query(None, description=" | ".join(PRESETS)),
    size: int = Query(DEFAULT_SIZE, description="longest side in pixels, clamped to [64, source size]"),
    format: Literal["jpeg", "png"] = Query("jpeg"),  # noqa: A002 - the public query parameter name
    *,
    user: CurrentUser,
    db: Db,
    settings: AppSettings,
) -> Response:
    """The image as an 8-bit JPEG/PNG; ``size`` is clamped to [64, source size]."""
    started = time.perf_counter()
    size = max(size, MIN_SIZE)
    image = _load(db, settings, user, study_uid, sop_uid, size)
    try:
        picture = render(image, wc=wc, ww=ww, preset=preset, size=size, fmt=format)
    except RenderError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from exc
    except Exception as exc:  # an odd header that survived decoding must not become a 500
        log.warning("cannot render image", extra={"sop_uid": sop_uid, "error": f"{type(exc).__name__}: {exc}"})
        raise LocalizedError(422, "usererror.image_not_displayable", error=f"image: {type(exc).__name__}") from exc
    log.debug(
        "rendered image",
        extra={"sop_uid": sop_uid, "bytes": len(picture.data), "ms": round(1000 * (time.perf_counter() - started))},
    )
    headers = {
        "Cache-Control": CACHE_CONTROL,
        "X-Image-Width": str(picture.width),
        "X-Image-Height": str(picture.height),
        "X-Window": picture.window,
    }
    return Response(picture.data, media_type=picture.media_type, headers=headers)


@api_router.get("/studies/{study_uid}/images/{sop_uid}/windows", response_model=schemas.ImageWindows)
def image_windows(study_uid: str, sop_uid: str, user: CurrentUser, db: Db, settings: AppSettings) -> dict[str, Any]:
    """The window presets (``dicom``, ``lung``, ``mediastinum``, ``bone``) in Modality-LUT units."""
    return windows_info(_load(db, settings, user, study_uid, sop_uid, DEFAULT_SIZE))  # the first view's decode
