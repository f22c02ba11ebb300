"""Job claims with leases: several worker processes share the durable queue (``triage/jobs.py``).

A claim holds the job until its lease runs out; renewing keeps it; a job whose worker stopped
renewing is taken over; nothing re-queues the job of a live worker. Time is an injected clock.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from xray_triage.store.db import Database
from xray_triage.store.schema import Instance, Series, Study, TriageJob
from xray_triage.triage import jobs

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
LEASE_S = 30.0


@pytest.fixture()
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    database.create_schema()
    with database.session() as session:
        study = Study(study_instance_uid="1.2", station_ae="ST1")
        series = Series(series_instance_uid="1.2.1", study=study)
        session.add_all([study, series])
        session.flush()
        for n in (1, 2):
            instance = Instance(
                sop_instance_uid=f"1.2.1.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", series_id=series.id,
                file_path=f"dicom/1.2/1.2.1/1.2.1.{n}.dcm", received_at=T0,
            )  # fmt: skip
            session.add(instance)
            session.flush()
            session.add(TriageJob(instance_id=instance.id))
    yield database
    database.dispose()


def at(seconds: float):  # type: ignore[no-untyped-def]
    return lambda: T0 + timedelta(seconds=seconds)


def test_a_live_lease_keeps_the_job_and_an_expired_one_is_taken_over(db: Database) -> None:
    first = jobs.claim_next(db, "hostA:100/0", lease_s=LEASE_S, clock=at(0))
    second = jobs.claim_next(db, "hostB:200/0", lease_s=LEASE_S, clock=at(1))
    assert (first.job_id, second.job_id) == (1, 2)  # each worker its own job
    assert jobs.claim_next(db, "hostB:200/1", lease_s=LEASE_S, clock=at(20)) is None  # both leases live

    assert jobs.renew_lease(db, first, lease_s=LEASE_S, clock=at(20))  # hostA lives: its lease runs to 50 s
    taken = jobs.claim_next(db, "hostB:200/1", lease_s=LEASE_S, clock=at(40))
    assert taken is not None and taken.job_id == 2  # hostB's own first claim expired at 31 s
    assert jobs.claim_next(db, "hostC:300/0", lease_s=LEASE_S, clock=at(45)) is None  # job 1 renewed

    taken = jobs.claim_next(db, "hostC:300/0", lease_s=LEASE_S, clock=at(51))  # hostA stopped renewing
    assert taken is not None and (taken.job_id, taken.attempts, taken.worker) == (1, 2, "hostC:300/0")
    assert not jobs.renew_lease(db, first, lease_s=LEASE_S, clock=at(52))  # hostA lost it, and is told so


def test_start_up_requeues_only_jobs_of_dead_processes_on_this_host(db: Database) -> None:
    host = socket.gethostname()[:40]
    dead = f"{host}:999999999/0"  # no such pid
    alive = f"{host}:{os.getppid()}/0"  # our parent: alive
    assert jobs.claim_next(db, dead, lease_s=LEASE_S, clock=at(0)) is not None
    assert jobs.claim_next(db, alive, lease_s=LEASE_S, clock=at(0)) is not None

    assert jobs.recover_dead_local(db) == 1

    with db.read_session() as session:
        states = dict(session.execute(select(TriageJob.id, TriageJob.state)).all())
        workers = dict(session.execute(select(TriageJob.id, TriageJob.worker)).all())
    assert states == {1: "queued", 2: "running"} and workers[2] == alive


def test_start_up_requeues_a_job_left_running_without_a_lease(db: Database) -> None:
    """A job a version before leases left running (its process crashed) is re-queued, as that version did."""
    with db.session() as session:
        session.execute(TriageJob.__table__.update().where(TriageJob.id == 1).values(state="running", worker="worker-0"))
    assert jobs.recover_dead_local(db) == 1
    with db.read_session() as session:
        assert session.get(TriageJob, 1).state == "queued"
