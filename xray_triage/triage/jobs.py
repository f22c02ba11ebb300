"""The durable triage queue, kept in the database.

A job is claimed with a conditional UPDATE (``... WHERE state = 'queued'``) and
checked by its row count: portable SQL that lets several workers (threads or
processes) share the queue without a lock table. A job left ``running`` by a
crash is put back to ``queued`` at start-up. The result row, the instance's AI
status, the job's state and the study summary change in one transaction, and
``triage_results.instance_id`` is unique: exactly one result per instance. The
``TriageCompleted`` / ``TriageFailed`` event goes into the outbox in that transaction too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from xray_triage.events import TriageCompleted, TriageFailed
from xray_triage.store import outbox
from xray_triage.store.db import Database
from xray_triage.store.records import refresh_study
from xray_triage.store.schema import (
    AI_DONE,
    AI_FAILED,
    JOB_DONE,
    JOB_FAILED,
    JOB_QUEUED,
    JOB_RUNNING,
    Instance,
    Series,
    Study,
    TriageJob,
    TriageResult,
    utcnow,
)
from xray_triage.triage.analyze import Analysis

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClaimedJob:
    job_id: int
    instance_id: int
    sop_instance_uid: str
    file_path: str
    attempts: int
    receive_ms: float | None
    store_ms: float | None
    queue_ms: float | None  # from the instance's commit to this claim


def recover_interrupted(db: Database) -> int:
    """Put jobs a crashed process left ``running`` back in the queue."""
    with db.session() as session:
        result = session.execute(
            update(TriageJob).where(TriageJob.state == JOB_RUNNING).values(state=JOB_QUEUED, worker=None)
        )
        return result.rowcount or 0


def claim_next(db: Database, worker: str) -> ClaimedJob | None:
    """Claim the oldest queued job, or return None when the queue is empty."""
    while True:
        with db.session() as session:
            job_id = session.scalar(
                select(TriageJob.id).where(TriageJob.state == JOB_QUEUED).order_by(TriageJob.id).limit(1)
            )
            if job_id is None:
                return None
            claimed = session.execute(
                update(TriageJob)
                .where(TriageJob.id == job_id, TriageJob.state == JOB_QUEUED)
                .values(state=JOB_RUNNING, worker=worker, started_at=utcnow(), attempts=TriageJob.attempts + 1)
            ).rowcount
            if claimed != 1:
                continue  # another worker took it; try the next one
            job = session.get(TriageJob, job_id)
            instance = session.get(Instance, job.instance_id)
            waited = (utcnow() - instance.received_at).total_seconds() * 1000 if instance.received_at else None
            return ClaimedJob(
                job_id=job_id,
                instance_id=instance.id,
                sop_instance_uid=instance.sop_instance_uid,
                file_path=instance.file_path,
                attempts=job.attempts,
                receive_ms=instance.receive_ms,
                store_ms=instance.store_ms,
                queue_ms=round(waited, 2) if waited is not None else None,
            )


def _study_of(session, instance_id: int) -> Study:  # type: ignore[no-untyped-def]
    return session.scalar(
        select(Study)
        .join(Series, Series.study_id == Study.id)
        .join(Instance, Instance.series_id == Series.id)
        .where(Instance.id == instance_id)
    )


def complete(db: Database, job: ClaimedJob, analysis: Analysis) -> None:
    """Record the result, mark instance and job done, refresh the study: one transaction."""
    timings = {"receive": job.receive_ms, "store": job.store_ms, "queue": job.queue_ms, **analysis.timings_ms}
    try:
        with db.session() as session:
            session.add(
                TriageResult(
                    instance_id=job.instance_id,
                    model_version=analysis.model_version,
                    probabilities=analysis.score.probabilities,
                    thresholds=analysis.thresholds,
                    flagged=analysis.score.flagged,
                    abnormal_score=analysis.score.abnormal_score,
                    priority=analysis.score.priority,
                    timings_ms=timings,
                    heatmaps=analysis.heatmaps,
                )
            )
            study = _finish(session, job, AI_DONE, JOB_DONE, None)
            if study is not None:
                score = analysis.score
                done = TriageCompleted(
                    study.study_instance_uid, study.station_ae, job.sop_instance_uid, job.instance_id,
                    score.priority, tuple(score.flagged),
                )  # fmt: skip
                outbox.record(session, done)
    except IntegrityError:
        # A result already exists (the job ran twice after a crash): keep the first one, whose
        # transaction also recorded its TriageCompleted.
        log.warning("result already recorded, keeping the first", extra={"instance_id": job.instance_id})
        with db.session() as session:
            _finish(session, job, AI_DONE, JOB_DONE, None)


def fail(db: Database, job: ClaimedJob, reason: str, *, permanent: bool, max_attempts: int) -> bool:
    """Record a failure; a transient one is re-queued until ``max_attempts``. True if final."""
    final = permanent or job.attempts >= max_attempts
    with db.session() as session:
        if final:
            study = _finish(session, job, AI_FAILED, JOB_FAILED, reason)
            if study is not None:
                failed = TriageFailed(
                    study.study_instance_uid, study.station_ae, job.sop_instance_uid, job.instance_id, reason
                )
                outbox.record(session, failed)
        else:
            session.execute(
                update(TriageJob).where(TriageJob.id == job.job_id).values(state=JOB_QUEUED, error=reason, worker=None)
            )
    return final


def _finish(session, job: ClaimedJob, ai_status: str, job_state: str, error: str | None) -> Study | None:  # type: ignore[no-untyped-def]
    """Mark the job and its instance finished and refresh the instance's study (returned)."""
    session.execute(
        update(TriageJob)
        .where(TriageJob.id == job.job_id)
        .values(state=job_state, finished_at=utcnow(), error=error)
    )
    session.execute(update(Instance).where(Instance.id == job.instance_id).values(ai_status=ai_status, ai_error=error))
    study = _study_of(session, job.instance_id)
    if study is not None:
        refresh_study(session, study)
    return study
