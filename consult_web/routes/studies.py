"""The study page (viewer, AI findings, key tags, priors) and the consult actions.

Consult actions are plain HTML form posts (they work without JavaScript); the
page's script re-fetches the consult panel when the live stream says the study
changed, so a station sees a specialist's reply without reloading.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from consult_web.access import visible_study
from consult_web.audit import audit
from consult_web.deps import AppSettings, CurrentUser, Db, ReadSession
from consult_web.ohif import study_viewer_url
from consult_web.permissions import can_request, can_see, is_specialist, visibility_clause
from consult_web.templating import render
from consult_web.viewer import viewer_context
from xray_triage.consults import rules as flow
from xray_triage.store.charset import decoded_text, header_encodings, python_codec
from xray_triage.store.consult_schema import CONCLUSIONS, URGENCIES, Consult
from xray_triage.store.db import Database
from xray_triage.store.dicom_meta import display_name
from xray_triage.store.queries import instance_reason
from xray_triage.store.schema import Station, Study
from xray_triage.store.users import AuthUser

log = logging.getLogger(__name__)
router = APIRouter()

KEY_TAGS = (
    "PatientName", "PatientID", "PatientSex", "PatientAge", "PatientBirthDate", "StudyDate", "StudyTime",
    "AccessionNumber", "Modality", "BodyPartExamined", "ViewPosition", "PhotometricInterpretation",
    "Rows", "Columns", "BitsStored", "WindowCenter", "WindowWidth", "Manufacturer",
    "ManufacturerModelName", "InstitutionName", "StationName",
)  # fmt: skip


def key_tags(data_dir: Path, file_path: str, default_character_set: str) -> list[tuple[str, str]]:
    """Header tags of the stored file, read without its pixels.

    Text is decoded as at ingest (``charset.header_encodings``): the declared character set,
    else UTF-8 when valid, else ``default_character_set``.
    """
    try:
        ds = pydicom.dcmread(data_dir / file_path, stop_before_pixels=True)
    except Exception as exc:  # a missing or damaged file should not break the page
        log.warning("cannot read DICOM header", extra={"file": file_path, "error": str(exc)})
        return []
    encodings = header_encodings(ds, python_codec(default_character_set))
    tags = []
    for keyword in KEY_TAGS:
        value = decoded_text(ds, keyword, encodings)
        if value is None or value == "":
            continue
        text = display_name(str(value)) if keyword == "PatientName" else str(value)
        tags.append((keyword, text[:200]))
    tags.append(("TransferSyntaxUID", getattr(ds.file_meta.get("TransferSyntaxUID"), "name", "")))
    return tags


def image_findings(study: Study) -> list[dict[str, Any]]:
    """Per image: every label's probability and threshold, flagged first."""
    images = []
    for series in study.series:
        for instance in series.instances:
            result = instance.result
            entry: dict[str, Any] = {
                "sop_uid": instance.sop_instance_uid,
                "view": instance.view_position,
                "ai_status": instance.ai_status,
                "ai_error": instance_reason(instance),
                "model_version": result.model_version if result else None,
                "priority": result.priority if result else None,
                "labels": [],
            }
            if result is not None:
                entry["labels"] = sorted(
                    (
                        {
                            "label": label,
                            "probability": float(p),
                            "threshold": float(result.thresholds.get(label, 0.5)),
                            "flagged": label in result.flagged,
                        }
                        for label, p in result.probabilities.items()
                    ),
                    key=lambda row: (not row["flagged"], -row["probability"]),
                )
            images.append(entry)
    return images


def _study_moment(study: Study) -> tuple[str, str]:
    """When the study was acquired, from DICOM StudyDate/StudyTime (DA ``YYYYMMDD``, TM ``HHMMSS.f``)."""
    return (study.study_date or "", (study.study_time or "").replace(":", ""))


def prior_studies(session: Session, user: AuthUser, study: Study, limit: int = 20) -> list[Study]:
    """The same patient's EARLIER studies, newest first, by DICOM StudyDate (+ StudyTime).

    A study without a StudyDate (on either side) cannot be placed in time and is left
    out rather than shown as a prior it may not be. Same date: the time decides; no
    time on both sides of one day: left out.
    """
    if not study.patient_id or not study.study_date:
        return []
    current_date, current_time = _study_moment(study)
    candidates = session.scalars(
        select(Study).where(
            Study.patient_id == study.patient_id,
            Study.id != study.id,
            Study.study_date != "",
            Study.study_date <= current_date,
            visibility_clause(user),
        )
    )
    earlier = []
    for other in candidates:
        date, time = _study_moment(other)
        if date < current_date or (date == current_date and time and current_time and time < current_time):
            earlier.append(other)
    earlier.sort(key=_study_moment, reverse=True)
    return earlier[:limit]


def consult_context(session: Session, user: AuthUser, study: Study) -> dict[str, Any]:
    consults = flow.consults_of(session, study)
    return {
        "study": study,
        "consults": consults,
        "open_consult": next((c for c in consults if c.status != "closed"), None),
        "urgencies": URGENCIES,
        "conclusions": CONCLUSIONS,
        "is_specialist": is_specialist(user),
        "can_request": can_request(user),
        "unanswered": {c.id: flow.unanswered_question(c, user) for c in consults if c.status != "closed"},
    }


@router.get("/studies/{study_uid}")
def study_page(request: Request, study_uid: str, user: CurrentUser, db: Db, settings: AppSettings) -> HTMLResponse:
    with db.session() as session:
        study = visible_study(session, user, study_uid)
        station = session.scalar(select(Station).where(Station.ae_title == study.station_ae))
        first = next((i for s in study.series for i in s.instances), None)
        context = {
            "study": study,
            "patient_name": display_name(study.patient_name),
            "station_name": station.name if station else "",
            "images": image_findings(study),
            "tags": key_tags(settings.data_dir, first.file_path, settings.default_character_set) if first else [],
            "priors": prior_studies(session, user, study),
            "viewer": viewer_context(session, user, study, request),
            "ohif_link": study_viewer_url(ohif, study.study_instance_uid) if (ohif := settings.ohif_link_base) else None,
            **consult_context(session, user, study),
        }
        audit(session, user, "study.view", study_uid=study_uid, request=request)
        return render(request, "study.html", context)


@router.get("/studies/{study_uid}/consult-panel")
def consult_panel(request: Request, study_uid: str, user: CurrentUser, session: ReadSession) -> HTMLResponse:
    study = visible_study(session, user, study_uid)
    return render(request, "_consult_panel.html", consult_context(session, user, study))


def _consult_for(session: Session, user: AuthUser, consult_id: int) -> tuple[Consult, Study]:
    consult = session.get(Consult, consult_id)
    study = session.get(Study, consult.study_id) if consult is not None else None
    if consult is None or study is None or not can_see(user, study):
        raise HTTPException(status_code=404, detail="consult not found")
    return consult, study


def _back(study: Study) -> Response:
    return RedirectResponse(f"/studies/{study.study_instance_uid}#consult", status_code=303)


@router.post("/studies/{study_uid}/consults")
def request_consult(
    request: Request,
    study_uid: str,
    question: str = Form(..., max_length=flow.MAX_QUESTION),
    urgency: str = Form("routine"),
    *,
    user: CurrentUser,
    db: Db,
) -> Response:
    with db.session() as session:
        study = visible_study(session, user, study_uid)
        consult = flow.request_consult(session, user, study, question, urgency)
        audit(session, user, "consult.request", study_uid=study_uid, request=request, consult_id=consult.id, urgency=urgency)
        return _back(study)


def _act(
    request: Request,
    db: Database,
    user: AuthUser,
    consult_id: int,
    action: str,
    change: Callable[[Session, Consult], Any],
) -> Response:
    """Apply one consult change and audit it in the same transaction; back to the study."""
    with db.session() as session:
        consult, study = _consult_for(session, user, consult_id)
        detail = change(session, consult) or {}
        audit(session, user, action, study_uid=study.study_instance_uid, request=request, consult_id=consult_id, **detail)
        return _back(study)


@router.post("/consults/{consult_id}/claim")
def claim_consult(request: Request, consult_id: int, user: CurrentUser, db: Db) -> Response:
    return _act(request, db, user, consult_id, "consult.claim", lambda session, c: flow.claim(session, user, c))


@router.post("/consults/{consult_id}/messages")
def reply_consult(
    request: Request,
    consult_id: int,
    body: str = Form(..., max_length=flow.MAX_MESSAGE),
    *,
    user: CurrentUser,
    db: Db,
) -> Response:
    def change(session: Session, consult: Consult) -> dict[str, Any]:
        return {"message_id": flow.reply(session, user, consult, body).id}

    return _act(request, db, user, consult_id, "consult.reply", change)


@router.post("/consults/{consult_id}/conclusion")
def conclude_consult(
    request: Request,
    consult_id: int,
    conclusion: str = Form(...),
    *,
    user: CurrentUser,
    db: Db,
) -> Response:
    def change(session: Session, consult: Consult) -> dict[str, Any]:
        flow.conclude(session, user, consult, conclusion)
        return {"conclusion": conclusion}

    return _act(request, db, user, consult_id, "consult.conclude", change)


@router.post("/consults/{consult_id}/close")
def close_consult(
    request: Request,
    consult_id: int,
    acknowledge_unanswered: str = Form(""),
    *,
    user: CurrentUser,
    db: Db,
) -> Response:
    """Close; ``acknowledge_unanswered=1`` says the closer knows the other side's question is unanswered."""
    acknowledged = acknowledge_unanswered == "1"

    def change(session: Session, consult: Consult) -> dict[str, Any]:
        unanswered = flow.unanswered_question(consult, user)
        flow.close(session, user, consult, acknowledge_unanswered=acknowledged)
        return {"unanswered_acknowledged": True} if unanswered else {}

    return _act(request, db, user, consult_id, "consult.close", change)
