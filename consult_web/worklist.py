"""The specialists' worklist: which studies, in which order, with what on each row.

Order: AI priority (urgent, abnormal, normal, not yet known), then consult status
(requested, in review, answered, no consult, closed), then arrival time, the
longest-waiting first. Filters: station, consult status, AI status, arrival
date (in the user's time zone) and flagged finding.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import case, select
from sqlalchemy.orm import Session, selectinload

from consult_web.access import visibility_clause
from consult_web.i18n import zone
from xray_triage.store.consult_schema import CONSULT_STATUS_RANK, CONSULT_STATUSES, Consult
from xray_triage.store.dicom_meta import display_name
from xray_triage.store.queries import station_names, top_findings
from xray_triage.store.schema import Instance, Series, Study, TriageResult, utcnow
from xray_triage.store.users import AuthUser

MAX_ROWS = 500
FINDING_SCAN_LIMIT = 5000  # studies looked at, at most, to fill a worklist filtered by finding
NO_CONSULT = "none"


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


def _latest_consult(column):  # type: ignore[no-untyped-def]
    """A column of the study's newest consult, as a correlated subquery (NULL: no consult)."""
    return select(column).where(Consult.study_id == Study.id).order_by(Consult.id.desc()).limit(1).scalar_subquery()


def _day_start(day: date, tz_name: str) -> datetime:
    return datetime.combine(day, time.min, tzinfo=zone(tz_name)).astimezone(UTC)


def _worklist_query(user: AuthUser, filters: WorklistFilters):  # type: ignore[no-untyped-def]
    status = _latest_consult(Consult.status)
    rank = case(
        *[(status == name, CONSULT_STATUS_RANK[name]) for name in CONSULT_STATUSES],
        else_=CONSULT_STATUS_RANK[None],
    )
    stmt = (
        select(Study, status.label("consult_status"), _latest_consult(Consult.urgency).label("urgency"))
        .where(visibility_clause(user))
        .options(selectinload(Study.series).selectinload(Series.instances).selectinload(Instance.result))
        .order_by(Study.priority_rank.desc(), rank, Study.received_at.asc(), Study.id.asc())
    )
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
    return stmt


def query_worklist(session: Session, user: AuthUser, filters: WorklistFilters) -> list[WorklistRow]:
    """At most MAX_ROWS rows in worklist order. The finding filter is applied in Python (flagged
    labels are JSON), over batches of MAX_ROWS studies and at most FINDING_SCAN_LIMIT of them."""
    stmt = _worklist_query(user, filters)
    names = station_names(session)
    now = utcnow()
    rows: list[WorklistRow] = []
    for offset in range(0, FINDING_SCAN_LIMIT if filters.finding else MAX_ROWS, MAX_ROWS):
        batch = session.execute(stmt.limit(MAX_ROWS).offset(offset)).all()
        for study, consult_status, urgency in batch:
            findings = top_findings(study)
            if filters.finding and filters.finding not in {f["label"] for f in findings}:
                continue
            rows.append(_row(study, findings, consult_status, urgency, names, now))
            if len(rows) >= MAX_ROWS:
                return rows
        if len(batch) < MAX_ROWS:
            break
    return rows


def _row(
    study: Study,
    findings: list[dict[str, Any]],
    consult_status: str | None,
    urgency: str | None,
    names: dict[str, str],
    now: datetime,
) -> WorklistRow:
    return WorklistRow(
        study_uid=study.study_instance_uid,
        patient_name=display_name(study.patient_name),
        patient_id=study.patient_id,
        patient_age=study.patient_age,
        patient_sex=study.patient_sex,
        station_ae=study.station_ae,
        station_name=names.get(study.station_ae, ""),
        received_at=study.received_at,
        waiting_s=(now - study.received_at).total_seconds(),
        ai_status=study.ai_status,
        priority=study.priority,
        findings=findings,
        consult_status=consult_status,
        consult_urgency=urgency,
        images=sum(len(s.instances) for s in study.series),
    )


def known_findings(session: Session) -> list[str]:
    """Labels the model can flag (for the finding filter), from the stored thresholds."""
    row = session.scalar(select(TriageResult).order_by(TriageResult.id.desc()).limit(1))
    return sorted(row.thresholds) if row is not None else []
