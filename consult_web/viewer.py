"""What the study page's image viewer (``_viewer.html`` + ``static/viewer.js``) needs.

Everything the script needs travels in one JSON blob (``viewer|tojson`` in the
template): the images with their sizes and render URLs, the AI heatmaps of each
image's flagged labels, the annotations at page load, the user's permissions and
the translated strings. The page itself never decodes an image: the first render is
requested by the browser, so a slow decode does not delay the HTML.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pydicom
from fastapi import Request
from sqlalchemy.orm import Session

from consult_web.i18n import FALLBACK, catalog
from consult_web.templating import request_language
from xray_triage.consults.annotations import DEFAULT_COLOR, annotations_of, can_annotate
from xray_triage.pipeline.render import DEFAULT_SIZE, PRESETS
from xray_triage.pipeline.spacing import pixel_spacing
from xray_triage.store.schema import Instance, Study
from xray_triage.store.users import AuthUser

log = logging.getLogger(__name__)

I18N_PREFIX = "viewer."


def viewer_context(session: Session, user: AuthUser, study: Study, request: Request) -> dict[str, Any]:
    """The viewer's data for one study page (called inside the page's DB session)."""
    study_uid = study.study_instance_uid
    data_dir = Path(request.app.state.settings.data_dir)
    images = [
        _image_entry(study_uid, instance, index, data_dir)
        for index, instance in enumerate((i for s in study.series for i in s.instances), start=1)
    ]
    language = request_language(request)
    return {
        "study_uid": study_uid,
        "images": images,
        "presets": list(PRESETS),
        "default_size": DEFAULT_SIZE,
        "annotations_url": f"/api/studies/{_q(study_uid)}/annotations",
        "annotation_url": "/api/annotations/",
        "annotations": annotations_of(session, study, user),
        "user_id": user.id,
        "can_annotate": can_annotate(user, study),
        "default_color": DEFAULT_COLOR,
        "language": language,
        "timezone": user.timezone,
        "i18n": viewer_strings(language),
    }


def viewer_strings(language: str) -> dict[str, str]:
    """The ``viewer.*`` strings (and ``finding.*`` names, for the heatmap list) of ``language``
    (English where a key is missing) for the script."""
    prefixes = (I18N_PREFIX, "finding.")
    strings = {k: v for k, v in catalog(FALLBACK).items() if k.startswith(prefixes)}
    strings.update({k: v for k, v in catalog(language).items() if k.startswith(prefixes)})
    return strings


def _q(uid: str) -> str:
    return quote(uid, safe=".")


def _image_entry(study_uid: str, instance: Instance, index: int, data_dir: Path) -> dict[str, Any]:
    header = _header(data_dir / instance.file_path)
    rows, columns = instance.rows, instance.columns
    if (not rows or not columns) and header is not None:
        rows, columns = int(header.get("Rows") or 0), int(header.get("Columns") or 0)
    spacing = pixel_spacing(header) if header is not None else None
    base = f"/studies/{_q(study_uid)}/images/{_q(instance.sop_instance_uid)}"
    return {
        "sop_uid": instance.sop_instance_uid,
        "index": index,
        "view": instance.view_position or "",
        "rows": rows,
        "columns": columns,
        "ai_status": instance.ai_status,
        "render_url": f"{base}/render",
        "first_url": f"{base}/render?size={DEFAULT_SIZE}",
        "windows_url": f"/api{base}/windows",
        "heatmaps": _heatmaps(instance),
        # mm per pixel for the measure tool (xray_triage.pipeline.spacing), None: no mm shown.
        "spacing": spacing.as_dict() if spacing is not None else None,
    }


def _heatmaps(instance: Instance) -> list[dict[str, Any]]:
    """Per flagged label with a stored map: grid (0..1), box [top, left, height, width], p and threshold."""
    result = instance.result
    if result is None:
        return []
    maps = result.heatmaps or {}
    entries = []
    for label in result.flagged or []:
        record = maps.get(label)
        if not record or "grid" not in record or "box" not in record:
            continue
        entries.append(
            {
                "label": label,
                "grid": record["grid"],
                "box": [float(v) for v in record["box"]],
                "probability": float(result.probabilities.get(label, 0.0)),
                "threshold": float(result.thresholds.get(label, 0.5)),
            }
        )
    return sorted(entries, key=lambda e: -e["probability"])


def _header(path: Path) -> Any:
    """The file's header without pixels (size, pixel spacing), or None when it cannot be read."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # the render route reports an unreadable file clearly; the page still shows
        log.warning("cannot read image header", extra={"file": str(path), "error": str(exc)})
        return None
