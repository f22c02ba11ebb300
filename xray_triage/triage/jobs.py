"""The durable triage queue, kept in the database, shared by any number of worker processes.

A job is claimed in one transaction: the oldest claimable row is selected ``FOR UPDATE SKIP
LOCKED`` on PostgreSQL (concurrent claimers skip each other's rows instead of waiting; on
SQLite the transaction already holds the one write lock from BEGIN IMMEDIATE) and then set
``running`` with a conditional UPDATE checked by its row count. Claimable means ``queued``,
or ``running`` with an expired *lease*: the claimant (a unique worker id, ``host:pid/n``)
holds the job until ``lease_expires_at`` and renews the lease while it works, so the job of
a worker that died (kill -9, power cut, lost machine) is taken over by another worker once
the lease has run out, while nothing ever requeues the job of a worker that is alive. At
start-up a process re-queues at once only the jobs of *dead processes on its own host*
(their pid no longer exists), which is what a single-process site restarting needs, and jobs
left running without a lease by a version before leases.

The result row, the instance's AI status, the job's state and the study summary change in one
transaction, and ``triage_results.instance_id`` is unique: exactly one result per instance,
even when a worker whose lease expired still finishes. The ``TriageCompleted`` /
``TriageFailed`` event goes into the outbox in that transaction too.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select, update
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
    worker: str = ""  # the id that holds the lease


Clock = Callable[[], datetime]
DEFAULT_LEASE_S = 60.0


def process_worker_id() -> str:
    """This process's worker id prefix, ``host:pid`` (unique among processes sharing a database)."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def recover_dead_local(db: Database, *, host: str | None = None) -> int:
    """Re-queue ``running`` jobs claimed by processes on this host that no longer exist, and
    ``running`` jobs without a lease (left by a version before leases, which re-queued them here).

    Jobs of live processes (this host or any other) are left alone; jobs of other hosts are
    taken over only when their lease expires (``claim_next``). Returns how many were re-queued.
    """
    host = host if host is not None else socket.gethostname()[:40]
    requeued = 0
    with db.session() as session:
        requeued += (
            session.execute(
                update(TriageJob)
                .where(TriageJob.state == JOB_RUNNING, TriageJob.lease_expires_at.is_(None))
                .values(state=JOB_QUEUED, worker=None)
            ).rowcount
            or 0
        )
        rows = session.execute(
            select(TriageJob.id, TriageJob.worker).where(
                TriageJob.state == JOB_RUNNING, TriageJob.worker.like(f"{host}:%")
            )
        ).all()
        for job_id, worker in rows:
            pid_text = worker[len(host) + 1 :].split("/", 1)[0]
            if pid_text.isdigit() and int(pid_text) != os.getpid() and not _pid_alive(int(pid_text)):
                requeued += (
                    session.execute(
                        update(TriageJob)
                        .where(
                            TriageJob.id == job_id, TriageJob.state == JOB_RUNNING, TriageJob.worker == worker
                        )
                        .values(state=JOB_QUEUED, worker=None, lease_expires_at=None)
                    ).rowcount
                    or 0
                )
    return requeued


def _claimable(now: datetime):  # type: ignore[no-untyped-def]
    """Queued, or running under a lease that has run out (or none: a job of 0.1.0's)."""
    return or_(
        TriageJob.state == JOB_QUEUED,
        and_(
            TriageJob.state == JOB_RUNNING,
            or_(TriageJob.lease_expires_at.is_(None), TriageJob.lease_expires_at < now),
        ),
    )


def claim_next(
    db: Database, worker: str, *, lease_s: float = DEFAULT_LEASE_S, clock: Clock = utcnow
) -> ClaimedJob | None:
    """Claim the oldest claimable job for ``lease_s`` seconds, or return None when there is none."""
    while True:
        now = clock()
        with db.session() as session:
            row = session.execute(
                select(TriageJob.id, TriageJob.state, TriageJob.worker)
                .where(_claimable(now))
                .order_by(TriageJob.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if row is None:
                return None
            job_id, previous_state, previous_worker = row
            claimed = session.execute(
                update(TriageJob)
                .where(TriageJob.id == job_id, _claimable(now))
                .values(
                    state=JOB_RUNNING,
                    worker=worker,
                    started_at=now,
                    lease_expires_at=now + timedelta(seconds=lease_s),
                    attempts=TriageJob.attempts + 1,
                )
            ).rowcount
            if claimed != 1:
                continue  # another worker took it; try the next one
            job = session.get(TriageJob, job_id)
            instance = session.get(Instance, job.instance_id)
            waited = (now - instance.received_at).total_seconds() * 1000 if instance.received_at else None
            if previous_state == JOB_RUNNING:
                log.warning(
                    "took over a triage job whose lease expired",
                    extra={"job_id": job_id, "previous_worker": previous_worker or "-", "worker": worker},
                )
            return ClaimedJob(
                job_id=job_id,
                instance_id=instance.id,
                sop_instance_uid=instance.sop_instance_uid,
                file_path=instance.file_path,
                attempts=job.attempts,
                receive_ms=instance.receive_ms,
                store_ms=instance.store_ms,
                queue_ms=round(waited, 2) if waited is not None else None,
                worker=worker,
            )


def renew_lease(
    db: Database, job: ClaimedJob, *, lease_s: float = DEFAULT_LEASE_S, clock: Clock = utcnow
) -> bool:
    """Extend ``job``'s lease; False if its worker no longer holds it (it was taken over)."""
    with db.session() as session:
        renewed = session.execute(
            update(TriageJob)
            .where(TriageJob.id == job.job_id, TriageJob.state == JOB_RUNNING, TriageJob.worker == job.worker)
            .values(lease_expires_at=clock() + timedelta(seconds=lease_s))
        ).rowcount
    return renewed == 1


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
            session.execute(  # only while this worker still holds it (not taken over meanwhile)
                update(TriageJob)
                .where(TriageJob.id == job.job_id, TriageJob.worker == job.worker)
                .values(state=JOB_QUEUED, error=reason, worker=None, lease_expires_at=None)
            )
    return final


def _finish(session, job: ClaimedJob, ai_status: str, job_state: str, error: str | None) -> Study | None:  # type: ignore[no-untyped-def]
    """Mark the job and its instance finished and refresh the instance's study (returned)."""
    session.execute(
        update(TriageJob)
        .where(TriageJob.id == job.job_id)
        .values(state=job_state, finished_at=utcnow(), error=error, lease_expires_at=None)
    )
    session.execute(
        update(Instance).where(Instance.id == job.instance_id).values(ai_status=ai_status, ai_error=error)
    )
    study = _study_of(session, job.instance_id)
    if study is not None:
        refresh_study(session, study)
    return study
