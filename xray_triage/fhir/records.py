"""The FHIR searches over the store: who may see what, which rows match, one page of resources.

Access is the web app's rule (``xray_triage/consults/visibility.py``): a station user
sees only its own station's studies, and the consults and reports on them; a study it
may not see is simply not in the Bundle. Rows are turned into resources by
:mod:`xray_triage.fhir.resources`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, func, select
from sqlalchemy.orm import Session, selectinload

from xray_triage.consults.visibility import visibility_clause
from xray_triage.fhir import resources as fr
from xray_triage.fhir.search import Search, dicom_date
from xray_triage.store.consult_schema import (
    CONSULT_ANSWERED,
    CONSULT_CLOSED,
    ROLE_SPECIALIST,
    Consult,
    ConsultMessage,
    User,
)
from xray_triage.store.schema import AI_DONE, AI_FAILED, Instance, Series, Study, TriageResult
from xray_triage.store.users import AuthUser


@dataclass(frozen=True)
class CardInfo:
    """What the loaded model card says about the model (for Device.identifier)."""

    model_version: str  # name@version
    sha256: str
    label_codes: dict[str, dict[str, str]] | None = (
        None  # label -> a SNOMED/RadLex coding, when the card has one
    )


@dataclass(frozen=True)
class Page:
    resources: list[Any]
    total: int


def _study_uid(value: str) -> str:
    return value.removeprefix("urn:oid:")


def _study_filters(user: AuthUser, search: Search) -> list[ColumnElement[bool]]:
    clauses: list[ColumnElement[bool]] = [visibility_clause(user)]
    if search.patient_id is not None:
        clauses.append(Study.patient_id == search.patient_id)
    if search.study_uid:
        clauses.append(Study.study_instance_uid == search.study_uid)
    return clauses


def _study_date_filters(search: Search) -> list[ColumnElement[bool]]:
    clauses: list[ColumnElement[bool]] = []
    if search.date_from:
        clauses.append(and_(Study.study_date != "", Study.study_date >= dicom_date(search.date_from)))
    if search.date_to:
        clauses.append(and_(Study.study_date != "", Study.study_date <= dicom_date(search.date_to)))
    return clauses


def _load_studies(session: Session, ids: Sequence[int]) -> dict[int, Study]:
    if not ids:
        return {}
    rows = session.scalars(
        select(Study)
        .where(Study.id.in_(ids))
        .options(selectinload(Study.series).selectinload(Series.instances))
    )
    return {s.id: s for s in rows}


def study_row(study: Study) -> fr.StudyRow:
    return fr.StudyRow(
        study_instance_uid=study.study_instance_uid,
        station_ae=study.station_ae,
        patient_id=study.patient_id,
        patient_name=study.patient_name,
        patient_sex=study.patient_sex,
        patient_birth_date=study.patient_birth_date,
        study_date=study.study_date,
        study_time=study.study_time,
        accession_number=study.accession_number,
        description=study.description,
        series=[
            fr.SeriesRow(
                series_instance_uid=s.series_instance_uid,
                modality=s.modality,
                series_number=s.series_number,
                description=s.description,
                body_part=s.body_part,
                instances=[
                    fr.InstanceRow(i.sop_instance_uid, i.sop_class_uid, i.instance_number)
                    for i in s.instances
                ],
            )
            for s in study.series
        ],
    )


def _page_ids(session: Session, statement: Select[Any], search: Search) -> tuple[list[Any], int]:
    total = session.scalar(select(func.count()).select_from(statement.subquery())) or 0
    ids = list(session.scalars(statement.offset(search.offset).limit(search.count)))
    return ids, total


# -- ImagingStudy --------------------------------------------------------------------------


def imaging_studies(session: Session, user: AuthUser, search: Search) -> Page:
    clauses = _study_filters(user, search) + _study_date_filters(search)
    uids = [_study_uid(v) for v in search.ids + search.identifiers]
    if uids:
        clauses.append(Study.study_instance_uid.in_(uids))
    ids, total = _page_ids(session, select(Study.id).where(*clauses).order_by(Study.id), search)
    studies = _load_studies(session, ids)
    return Page([fr.imaging_study(study_row(studies[i])) for i in ids if i in studies], total)


# -- DiagnosticReport ----------------------------------------------------------------------


def diagnostic_reports(session: Session, user: AuthUser, search: Search, card: CardInfo | None) -> Page:
    """AI reports (studies triaged or failed) first, then answered consults' reports."""
    study_clauses = _study_filters(user, search) + _study_date_filters(search)
    ai_uids: list[str] = []  # from identifier=urn:dicom:uid|urn:oid:<uid>
    ai_keys: list[int] = []  # from _id=ai-<n>
    consult_ids: list[int] = []  # from _id=consult-<n> or identifier=urn:xray-triage:consult|<n>
    for value in search.ids:
        kind, _, number = value.partition("-")
        target = ai_keys if kind == "ai" else consult_ids
        target.append(int(number) if kind in ("ai", "consult") and number.isdigit() else -1)
    for value in search.identifiers:
        if value.isdigit():
            consult_ids.append(int(value))
        else:
            ai_uids.append(_study_uid(value))
    wants_ai = not (search.ids or search.identifiers) or bool(ai_uids or ai_keys)
    wants_consults = not (search.ids or search.identifiers) or bool(consult_ids)

    keys: list[tuple[str, int]] = []
    if wants_ai:
        ai = select(Study.id).where(*study_clauses, Study.ai_status.in_((AI_DONE, AI_FAILED)))
        if ai_uids:
            ai = ai.where(Study.study_instance_uid.in_(ai_uids))
        if ai_keys:
            ai = ai.where(Study.id.in_(ai_keys))
        keys += [("ai", i) for i in session.scalars(ai.order_by(Study.id))]
    if wants_consults:
        answered = (
            select(Consult.id)
            .join(Study, Consult.study_id == Study.id)
            .where(
                *study_clauses,
                Consult.status.in_((CONSULT_ANSWERED, CONSULT_CLOSED)),
                _has_specialist_answer(),
            )
        )
        if consult_ids:
            answered = answered.where(Consult.id.in_(consult_ids))
        keys += [("consult", i) for i in session.scalars(answered.order_by(Consult.id))]
    page = keys[search.offset : search.offset + search.count]
    ai_ids = [i for kind, i in page if kind == "ai"]
    studies = _load_studies(session, ai_ids)
    results = _results_of(session, ai_ids)
    consults = _load_consults(session, [i for kind, i in page if kind == "consult"])
    out: list[Any] = []
    for kind, i in page:
        if kind == "ai" and i in studies:
            out.append(fr.ai_report(_ai_row(studies[i], results.get(i, []), card)))
        elif kind == "consult" and i in consults:
            out.append(fr.consult_report(consults[i]))
    return Page(out, len(keys))


def _has_specialist_answer() -> ColumnElement[bool]:
    """A conclusion was set, or a specialist wrote in the thread."""
    wrote = (
        select(ConsultMessage.id)
        .join(User, ConsultMessage.author_id == User.id)
        .where(ConsultMessage.consult_id == Consult.id, User.role == ROLE_SPECIALIST)
        .exists()
    )
    return Consult.conclusion.is_not(None) | wrote


def _results_of(session: Session, study_ids: Sequence[int]) -> dict[int, list[TriageResult]]:
    out: dict[int, list[TriageResult]] = {}
    if not study_ids:
        return out
    for study_id, result in session.execute(
        select(Series.study_id, TriageResult)
        .join(Instance, Instance.series_id == Series.id)
        .join(TriageResult, TriageResult.instance_id == Instance.id)
        .where(Series.study_id.in_(study_ids))
        .order_by(TriageResult.id)
    ):
        out.setdefault(study_id, []).append(result)
    return out


def _ai_row(study: Study, results: list[TriageResult], card: CardInfo | None) -> fr.AiResultRow:
    best: dict[str, list[Any]] = {}  # label -> [probability, threshold, flagged]
    for result in results:
        for label, p in result.probabilities.items():
            entry = best.setdefault(label, [0.0, float(result.thresholds.get(label, 0.0)), False])
            if float(p) > entry[0]:
                entry[0], entry[1] = float(p), float(result.thresholds.get(label, entry[1]))
            entry[2] = entry[2] or label in result.flagged
    model = None
    if results:
        version = results[-1].model_version
        name, _, number = version.partition("@")
        sha = card.sha256 if card is not None and card.model_version == version else ""
        model = fr.ModelInfo(name=name, version=number or "unknown", sha256=sha)
    codes = (card.label_codes or {}) if card is not None else {}
    findings = [
        fr.Finding(label, p, t, flagged, codes.get(label))
        for label, (p, t, flagged) in sorted(best.items(), key=lambda kv: -kv[1][0])
    ]
    issued = max((r.created_at for r in results), default=None)
    return fr.AiResultRow(study.id, study_row(study), study.ai_status, model, findings, issued)


# -- consults ------------------------------------------------------------------------------


def _load_consults(session: Session, ids: Sequence[int]) -> dict[int, fr.ConsultRow]:
    if not ids:
        return {}
    consults = session.scalars(
        select(Consult)
        .where(Consult.id.in_(ids))
        .options(
            selectinload(Consult.messages).selectinload(ConsultMessage.author),
            selectinload(Consult.requested_by),
            selectinload(Consult.claimed_by),
        )
    ).all()
    studies = _load_studies(session, sorted({c.study_id for c in consults}))
    out = {}
    for c in consults:
        specialist_messages = [m for m in c.messages if m.author.role == ROLE_SPECIALIST]
        specialist = c.claimed_by or (specialist_messages[-1].author if specialist_messages else None)
        out[c.id] = fr.ConsultRow(
            id=c.id,
            study=study_row(studies[c.study_id]),
            status=c.status,
            urgency=c.urgency,
            question=c.question,
            requested_by=_name(c.requested_by),
            created_at=c.created_at,
            updated_at=c.updated_at,
            conclusion=c.conclusion,
            specialist=_name(specialist) if specialist is not None else "",
            specialist_text=specialist_messages[-1].body if specialist_messages else "",
            answered=bool(c.conclusion or specialist_messages),
        )
    return out


def _name(user: User) -> str:
    return user.display_name or user.username


def service_requests(session: Session, user: AuthUser, search: Search) -> Page:
    clauses = _study_filters(user, search)
    if search.date_from:
        clauses.append(func.date(Consult.created_at) >= search.date_from.isoformat())
    if search.date_to:
        clauses.append(func.date(Consult.created_at) <= search.date_to.isoformat())
    wanted = search.ids + search.identifiers
    if wanted:
        numbers = [v.removeprefix("consult-") for v in wanted]
        clauses.append(Consult.id.in_([int(n) for n in numbers if n.isdigit()] or [-1]))
    statement = (
        select(Consult.id).join(Study, Consult.study_id == Study.id).where(*clauses).order_by(Consult.id)
    )
    ids, total = _page_ids(session, statement, search)
    consults = _load_consults(session, ids)
    return Page([fr.service_request(consults[i]) for i in ids if i in consults], total)
