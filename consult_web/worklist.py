"""The specialists' worklist: which studies, in which order, with what on each row.

Order: ``xray_triage.store.worklist_order`` (the one definition, shared with
``/api/studies`` and ``studies list``): open emergency consults, open urgent
requests, AI-urgent, then the rest by AI priority; each row says why (``why``).
Filters: station, consult status, AI status, arrival date (in the user's time
zone) and flagged finding, all in SQL, so the list is paged (``worklist_page_size`` rows) and a page loads only what its rows show.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from consult_web.i18n import zone
from consult_web.permissions import visibility_clause
from xray_triage.store.consult_schema import CONSULT_STATUSES, Consult
from xray_triage.store.dicom_meta import display_name
from xray_triage.store.queries import RowExtras, flagged_clause, row_extras, station_names
from xray_triage.store.schema import Study, TriageResult, utcnow
from xray_triage.store.users import AuthUser
from xray_triage.store.worklist_order import consult_columns, latest_consult, order_by, why

NO_CONSULT = "none"
ROW_COLUMNS = (  # what a row shows of the study itself: no series, images or results are loaded
    Study.id,
    Study.study_instance_uid,
    Study.patient_name,
    Study.patient_id,
    Study.patient_age,
    Study.patient_sex,
    Study.station_ae,
    Study.received_at,
    Study.ai_status,
    Study.priority,
)


@dataclass(frozen=True)
class WorklistFilters:
    station: str = ""
    status: str = ""  # a consult status, "none" (no consult) or "" (any)
    ai: str = ""  # pending | done | failed | not_applicable | ""
    date_from: date | None = None
    date_to: date | None = None
    finding: str = ""

    def as_query(self) -> dict[str, str]:
        values = {
            "station": self.station,
            "status": self.status,
            "ai": self.ai,
            "date_from": self.date_from.isoformat() if self.date_from else "",
            "date_to": self.date_to.isoformat() if self.date_to else "",
            "finding": self.finding,
        }
        return {k: v for k, v in values.items() if v}


@dataclass(frozen=True)
class WorklistRow:
    study_uid: str
    patient_name: str
    patient_id: str
    patient_age: str
    patient_sex: str
    station_ae: str
    station_name: str
    received_at: datetime
    waiting_s: float
    ai_status: str
    priority: str | None
    findings: list[dict[str, Any]]
    consult_status: str | None
    consult_urgency: str | None
    images: int
    why: str  # the row's tier in the worklist order (worklist_order.TIERS)
    consult_conclusion: str | None = None  # the newest consult's conclusion, once a specialist set one


def _day_start(day: date, tz_name: str) -> datetime:
    return datetime.combine(day, time.min, tzinfo=zone(tz_name)).astimezone(UTC)


@dataclass(frozen=True)
class WorklistPage:
    """One page of the worklist: ``page`` counts from 1; ``total`` studies match the filters."""

    rows: list[WorklistRow]
    page: int
    page_size: int
    total: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.page_size))

    @property
    def first_index(self) -> int:
        """1-based position of the page's first row (0 when empty), for "41-50 of 420"."""
        return (self.page - 1) * self.page_size + 1 if self.rows else 0

    @property
    def last_index(self) -> int:
        return (self.page - 1) * self.page_size + len(self.rows)


def _filtered(user: AuthUser, filters: WorklistFilters, stmt, status):  # type: ignore[no-untyped-def]
    stmt = stmt.where(visibility_clause(user))
    if filters.station:
        stmt = stmt.where(Study.station_ae == filters.station)
    if filters.ai:
        stmt = stmt.where(Study.ai_status == filters.ai)
    if filters.status == NO_CONSULT:
        stmt = stmt.where(status.is_(None))
    elif filters.status in CONSULT_STATUSES:
        stmt = stmt.where(status == filters.status)
    if filters.date_from:
        stmt = stmt.where(Study.received_at >= _day_start(filters.date_from, user.timezone))
    if filters.date_to:
        stmt = stmt.where(Study.received_at < _day_start(filters.date_to + timedelta(days=1), user.timezone))
    if filters.finding:
        stmt = stmt.where(flagged_clause(filters.finding))
    return stmt


def query_worklist(
    session: Session,
    user: AuthUser,
    filters: WorklistFilters,
    *,
    page: int = 1,
    page_size: int = 50,
    urgent_labels: Collection[str] = (),
) -> WorklistPage:
    """Page ``page`` (from 1; past the last page gives the last) of ``page_size`` rows in worklist order.

    ``urgent_labels`` (the model card's) mark the findings that made a study urgent.
    """
    status, urgency = consult_columns()
    total = session.scalar(_filtered(user, filters, select(func.count(Study.id)), status)) or 0
    pages = max(1, -(-total // page_size))
    page = min(max(page, 1), pages)
    stmt = _filtered(
        user,
        filters,
        select(*ROW_COLUMNS, status.label("consult_status"), urgency.label("urgency"),
               latest_consult(Consult.conclusion).label("conclusion")),
        status,
    ).order_by(*order_by(status, urgency))
    found = session.execute(stmt.limit(page_size).offset((page - 1) * page_size)).all()
    extras = row_extras(session, [r.id for r in found], urgent_labels)
    names = station_names(session)
    now = utcnow()
    rows = [_row(r, extras.get(r.id, RowExtras([], 0)), names, now) for r in found]
    return WorklistPage(rows, page, page_size, total)


def _row(found, extras: RowExtras, names: dict[str, str], now: datetime) -> WorklistRow:  # type: ignore[no-untyped-def]
    return WorklistRow(
        study_uid=found.study_instance_uid,
        patient_name=display_name(found.patient_name),
        patient_id=found.patient_id,
        patient_age=found.patient_age,
        patient_sex=found.patient_sex,
        station_ae=found.station_ae,
        station_name=names.get(found.station_ae, ""),
        received_at=found.received_at,
        waiting_s=(now - found.received_at).total_seconds(),
        ai_status=found.ai_status,
        priority=found.priority,
        findings=extras.findings,
        consult_status=found.consult_status,
        consult_urgency=found.urgency,
        images=extras.instances,
        consult_conclusion=found.conclusion,
        why=why(found.priority, found.consult_status, found.urgency),
    )


def known_findings(session: Session) -> list[str]:
    """Labels the model can flag (for the finding filter), from the stored thresholds."""
    row = session.scalar(select(TriageResult).order_by(TriageResult.id.desc()).limit(1))
    return sorted(row.thresholds) if row is not None else []
