"""``GET /studies/{uid}/report.pdf``: the printable consult report of one study.

Same access rule as the study page (``visible_study``: a station sees only its own
studies, any other answers 404) and audited the same way, as a view
(``study.view`` with ``report="pdf"`` and the language). The PDF is made on the server
(``consult_web.report``) in the language asked for (``?lang=vi|en``, default the
user's), so a station can print or forward it without the web app.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from sqlalchemy import select

from consult_web.access import visible_study
from consult_web.audit import audit
from consult_web.deps import AppSettings, CurrentUser, Db
from consult_web.errors import LocalizedError
from consult_web.i18n import finding_name, format_age_sex, format_datetime, translate
from consult_web.report import annotated_picture, html_to_pdf
from consult_web.routes.studies import image_findings
from consult_web.templating import environment, request_language, request_timezone
from xray_triage import __version__
from xray_triage.consults import rules as flow
from xray_triage.consults.annotations import annotations_of
from xray_triage.pipeline.pixels import PixelError
from xray_triage.pipeline.render import image_cache
from xray_triage.settings import Settings
from xray_triage.store.dicom_meta import display_name
from xray_triage.store.schema import Station, utcnow

log = logging.getLogger(__name__)
router = APIRouter()

MAX_REPORT_IMAGES = 4  # a chest study is one to three views; more would only be scout or repeat images


def _picture(settings: Settings, file_path: str, marks: list[dict[str, Any]]) -> str | None:
    """One image with its marks as a data URI, or None when it cannot be decoded."""
    try:
        image = image_cache(settings.render_cache_images, settings.max_frame_pixels).get(
            Path(settings.data_dir) / file_path, size=1400
        )
        return annotated_picture(image, marks)
    except (PixelError, ValueError, OSError) as exc:  # the report still prints, without the picture
        log.warning("report: image not rendered", extra={"file": file_path, "error": str(exc)})
        return None


def css_string(text: str) -> str:
    """``text`` as a quoted CSS string (CSS Syntax 4.3.5): for the page footer, which CSS draws.

    Backslash, quote, line breaks and ``<`` are escaped, so a patient name from a DICOM
    header can neither end the string nor the ``<style>`` element.
    """
    escaped = "".join(f"\\{ord(c):x} " if c in '\\"<>\n\r\f' else c for c in text)
    return f'"{escaped}"'


def dicom_date(value: str, language: str) -> str:
    """A DICOM DA (``YYYYMMDD``, PS3.5 6.2) as ``dd/mm/yyyy`` (vi) or ``yyyy-mm-dd`` (en); else as stored."""
    if len(value) != 8 or not value.isdigit():
        return value
    year, month, day = value[:4], value[4:6], value[6:]
    return f"{day}/{month}/{year}" if language == "vi" else f"{year}-{month}-{day}"


@router.get("/studies/{study_uid}/report.pdf")
def study_report(
    request: Request,
    study_uid: str,
    user: CurrentUser,
    db: Db,
    settings: AppSettings,
    lang: Literal["vi", "en"] | None = Query(None, description="vi | en; default the user's language"),
) -> Response:
    """The consult report as ``application/pdf`` (A4), 404 when the user may not see the study."""
    started = time.perf_counter()
    language = lang or request_language(request)
    timezone = request_timezone(request)
    # The image is decoded with no database session open (as for the viewer's pictures), then
    # the page is filled and the view audited in one short transaction.
    with db.read_session() as session:
        study = visible_study(session, user, study_uid)
        instances = [i for series in study.series for i in series.instances][:MAX_REPORT_IMAGES]
        all_marks = annotations_of(session, study, user)
        shown = [(i.sop_instance_uid, i.view_position, i.file_path) for i in instances]
    figures = []
    for sop_uid, view, file_path in shown:
        marks = [m for m in all_marks if m["instance_uid"] == sop_uid]
        figures.append({"view": view, "marks": marks, "picture": _picture(settings, file_path, marks)})
    with db.session() as session:
        study = visible_study(session, user, study_uid)
        station = session.scalar(select(Station).where(Station.ae_title == study.station_ae))
        images = image_findings(study)
        context = {
            "lang": language,
            "t": lambda key, **values: translate(language, key, **values),
            "fmt_dt": lambda value: format_datetime(value, timezone, language),
            "fmt_age_sex": lambda age, sex: format_age_sex(age, sex, language),
            "finding": lambda label: finding_name(label, language),
            "css_string": css_string,
            "study": study,
            "patient_name": display_name(study.patient_name),
            "study_date": dicom_date(study.study_date, language),
            "station_name": station.name if station else "",
            "images": images,
            "figures": figures,
            "consults": flow.consults_of(session, study),
            "footer": " · ".join(
                part for part in (display_name(study.patient_name), study.patient_id, translate(language, "report.title")) if part
            ),
            "printed_at": utcnow(),
            "printed_by": user.display_name or user.username,
            "app_version": __version__,
            "model_used": next((i["model_version"] for i in images if i["model_version"]), None)
            or (request.app.state.card.model_version if request.app.state.card is not None else ""),
        }
        html = environment.get_template("report.html").render(context)
        audit(session, user, "study.view", study_uid=study_uid, request=request, report="pdf", lang=language)
    try:
        pdf = html_to_pdf(html)
    except (ImportError, OSError) as exc:  # WeasyPrint or the Pango libraries it loads are not installed
        log.error("cannot make the consult report: %s", exc, extra={"study_uid": study_uid})
        raise LocalizedError(503, "usererror.report_unavailable") from exc
    log.info(
        "consult report made",
        extra={"study_uid": study_uid, "lang": language, "bytes": len(pdf), "ms": round(1000 * (time.perf_counter() - started))},
    )
    filename = f"report-{study_uid}-{language}.pdf"
    headers = {"Content-Disposition": f'inline; filename="{filename}"', "Cache-Control": "private, no-store"}
    return Response(pdf, media_type="application/pdf", headers=headers)
