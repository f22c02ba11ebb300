"""Database operations on studies, series and instances (no DICOM networking here)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, Insert, bindparam, insert, select, update
from sqlalchemy.orm import Session

from xray_triage.priority import PRIORITY_RANK
from xray_triage.store.dicom_meta import InstanceMeta
from xray_triage.store.schema import (
    AI_DONE,
    AI_FAILED,
    AI_NOT_APPLICABLE,
    AI_PENDING,
    Instance,
    QuarantinedInstance,
    Series,
    Study,
    TriageJob,
    TriageResult,
    utcnow,
)


@dataclass(frozen=True)
class Receipt:
    """Where and how an instance arrived (for the record and the timings)."""

    relpath: str
    file_size: int
    transfer_syntax_uid: str
    calling_ae: str
    peer_address: str
    receive_ms: float | None
    store_ms: float | None


def find_instance(session: Session, sop_instance_uid: str) -> Instance | None:
    return session.scalar(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid))


# Built once: these run for every received image (see ``add_instance``).
_STUDY_ID = select(Study.id).where(Study.study_instance_uid == bindparam("uid"))
_SERIES_ID = select(Series.id).where(Series.series_instance_uid == bindparam("uid"))
_INSERT_STUDY = insert(Study.__table__)
_INSERT_SERIES = insert(Series.__table__)
_INSERT_INSTANCE = insert(Instance.__table__)
_INSERT_JOB = insert(TriageJob.__table__)
_STUDY_PENDING = (
    update(Study.__table__)
    .where(Study.__table__.c.id == bindparam("study_id"))
    .values(ai_status=AI_PENDING, updated_at=bindparam("now"))
)


def add_instance(session: Session, meta: InstanceMeta, receipt: Receipt, *, triage: bool) -> int:
    """Insert the instance (with its study and series if new) and, if asked, its triage job; return its id.

    Prepared SQLAlchemy Core statements on the session's connection, not ORM objects: this runs
    for every received image inside the gateway's write transaction, where the ORM's unit of
    work and building each statement anew cost more CPU than the inserts themselves (issue 17's
    profile). The study's AI status and priority are kept as ``refresh_study`` computes them.
    """
    conn = session.connection()
    study_id = conn.execute(_STUDY_ID, {"uid": meta.study_instance_uid}).scalar()
    if study_id is None:
        study_id = _insert(
            conn,
            _INSERT_STUDY,
            study_instance_uid=meta.study_instance_uid,
            patient_id=meta.patient_id,
            patient_name=meta.patient_name,
            patient_sex=meta.patient_sex,
            patient_birth_date=meta.patient_birth_date,
            patient_age=meta.patient_age,
            study_date=meta.study_date,
            study_time=meta.study_time,
            accession_number=meta.accession_number,
            description=meta.study_description,
            institution_name=meta.institution_name,
            station_ae=receipt.calling_ae,
        )
    series_id = conn.execute(_SERIES_ID, {"uid": meta.series_instance_uid}).scalar()
    if series_id is None:
        series_id = _insert(
            conn,
            _INSERT_SERIES,
            series_instance_uid=meta.series_instance_uid,
            study_id=study_id,
            modality=meta.modality,
            body_part=meta.body_part,
            series_number=meta.series_number,
            description=meta.series_description,
        )
    instance_id = _insert(
        conn,
        _INSERT_INSTANCE,
        sop_instance_uid=meta.sop_instance_uid,
        sop_class_uid=meta.sop_class_uid,
        series_id=series_id,
        transfer_syntax_uid=receipt.transfer_syntax_uid,
        instance_number=meta.instance_number,
        view_position=meta.view_position,
        rows=meta.rows,
        columns=meta.columns,
        file_path=receipt.relpath,
        file_size=receipt.file_size,
        calling_ae=receipt.calling_ae,
        peer_address=receipt.peer_address,
        receive_ms=receipt.receive_ms,
        store_ms=receipt.store_ms,
        ai_status=AI_PENDING if triage else AI_NOT_APPLICABLE,
    )
    if triage:
        _insert(conn, _INSERT_JOB, instance_id=instance_id)
        # A waiting image makes the study pending; its priority (from results) is unchanged.
        conn.execute(_STUDY_PENDING, {"study_id": study_id, "now": utcnow()})
    else:
        study = session.get(Study, study_id)
        assert study is not None
        refresh_study(session, study)
    return instance_id


def _insert(conn: Connection, statement: Insert, **values: object) -> int:
    """Run a prepared INSERT for one row (column defaults applied); its primary key."""
    return int(conn.execute(statement, values).inserted_primary_key[0])


def refresh_study(session: Session, study: Study) -> None:
    """Recompute the study's AI status and priority from its instances.

    Status: pending while any image waits; else done if any image was triaged;
    else failed if any failed; else not_applicable. Priority: the highest of
    its images' results.
    """
    session.flush()
    rows = session.execute(
        select(Instance.ai_status, Instance.id)
        .join(Series, Instance.series_id == Series.id)
        .where(Series.study_id == study.id)
    ).all()
    statuses = {status for status, _ in rows}
    if AI_PENDING in statuses:
        study.ai_status = AI_PENDING
    elif AI_DONE in statuses:
        study.ai_status = AI_DONE
    elif AI_FAILED in statuses:
        study.ai_status = AI_FAILED
    else:
        study.ai_status = AI_NOT_APPLICABLE
    priorities = session.scalars(
        select(TriageResult.priority).where(TriageResult.instance_id.in_([i for _, i in rows]))
    ).all()
    best = max(priorities, key=lambda p: PRIORITY_RANK.get(p, 0), default=None)
    study.priority = best
    study.priority_rank = PRIORITY_RANK.get(best, 0)
    study.updated_at = utcnow()


@dataclass(frozen=True)
class QuarantineRecord:
    """What is kept of a quarantined instance besides its file."""

    reason: str
    detail: str
    conflicting_station_ae: str
    sha256: str


def add_quarantined(
    session: Session, meta: InstanceMeta, receipt: Receipt, record: QuarantineRecord
) -> QuarantinedInstance:
    """Record an instance kept apart (no study, series, instance row or triage job)."""
    row = QuarantinedInstance(
        reason=record.reason,
        detail=record.detail,
        sop_instance_uid=meta.sop_instance_uid,
        sop_class_uid=meta.sop_class_uid,
        study_instance_uid=meta.study_instance_uid,
        series_instance_uid=meta.series_instance_uid,
        conflicting_station_ae=record.conflicting_station_ae,
        transfer_syntax_uid=receipt.transfer_syntax_uid,
        file_path=receipt.relpath,
        file_size=receipt.file_size,
        sha256=record.sha256,
        calling_ae=receipt.calling_ae,
        peer_address=receipt.peer_address,
    )
    session.add(row)
    session.flush()
    return row


def find_quarantined_copy(
    session: Session, sop_instance_uid: str, calling_ae: str, sha256: str
) -> int | None:
    """The id of an identical quarantined copy from the same station (a re-send), if any."""
    return session.scalar(
        select(QuarantinedInstance.id).where(
            QuarantinedInstance.sop_instance_uid == sop_instance_uid,
            QuarantinedInstance.calling_ae == calling_ae,
            QuarantinedInstance.sha256 == sha256,
        )
    )


def list_quarantined(session: Session, limit: int = 200) -> list[QuarantinedInstance]:
    """Newest first, for the admin page."""
    return list(
        session.scalars(select(QuarantinedInstance).order_by(QuarantinedInstance.id.desc()).limit(limit))
    )
