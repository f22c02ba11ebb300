"""Operators' metrics in the Prometheus text format (prometheus-client), served at ``/metrics``.

Two kinds, and why:

* **counters and histograms** of this process, updated by in-process event
  handlers (:class:`xray_triage.events.EventHandlers`, called after each commit):
  images received per station, triage results per priority, triage jobs failed
  for good, triage latency (image received -> its triage result committed) and
  consult turnaround (consult requested -> answered). With several server
  processes each counts what *its* commits did, from its start: sum them over
  processes in PromQL (``sum without(instance)(rate(...))``);
* **gauges read from the database at scrape time** by :class:`DatabaseCollector`,
  one cheap aggregate query each: triage queue depth and age of its oldest job,
  each PACS destination's backlog (deliveries pending) and its age, and any other
  durable queue registered with :meth:`DatabaseCollector.add_backlog`. They are
  the same whichever process is scraped.

Labels carry station AE titles, priorities, urgencies and queue names only,
never patient data or UIDs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from xray_triage.events import (
    ConsultAnswered,
    InstanceQuarantined,
    InstanceStored,
    TriageCompleted,
    TriageFailed,
)
from xray_triage.store.consult_schema import Consult
from xray_triage.store.db import Database
from xray_triage.store.delivery_schema import DELIVERY_PENDING, Delivery, Destination
from xray_triage.store.schema import JOB_QUEUED, JOB_RUNNING, Instance, TriageJob

log = logging.getLogger(__name__)

PREFIX = "xray_triage"
# Seconds. Triage: a 2800 px image takes ~0.1-0.3 s on a CPU; a queue behind a burst, minutes.
TRIAGE_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
# Seconds. Consults are answered in minutes to days.
CONSULT_TURNAROUND_BUCKETS = (
    300.0,
    900.0,
    1800.0,
    3600.0,
    7200.0,
    14400.0,
    28800.0,
    86400.0,
    172800.0,
    604800.0,
)


@dataclass(frozen=True)
class Backlog:
    """A durable queue whose size the collector reports: ``query(session)`` -> ``{label: (count, oldest)}``."""

    name: str  # metric suffix, e.g. "destination" -> xray_triage_destination_backlog
    label: str  # label name, e.g. "destination"
    help: str
    query: Callable[[Session], dict[str, tuple[int, datetime | None]]]


def destination_backlog(session: Session) -> dict[str, tuple[int, datetime | None]]:
    """Per destination (by name, every configured one): objects not yet sent, and the oldest's queueing time."""
    rows = session.execute(
        select(Destination.name, func.count(Delivery.id), func.min(Delivery.created_at))
        .outerjoin(
            Delivery, (Delivery.destination_id == Destination.id) & (Delivery.state == DELIVERY_PENDING)
        )
        .group_by(Destination.name)
    ).all()
    return {name: (count, oldest) for name, count, oldest in rows}


DESTINATION_BACKLOG = Backlog(
    name="destination",
    label="destination",
    help="objects queued for a PACS destination and not yet acknowledged (deliveries pending), by destination name",
    query=destination_backlog,
)


class DatabaseCollector(Collector):
    """Gauges computed at scrape time from the database; right whichever process is scraped."""

    def __init__(self, db: Database, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.db = db
        self.clock = clock
        self.backlogs: list[Backlog] = []

    def add_backlog(self, backlog: Backlog) -> None:
        self.backlogs.append(backlog)

    def describe(self) -> Iterable[object]:
        return []  # unchecked collector: its families depend on the backlogs registered

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily(
            f"{PREFIX}_database_up", "1 when the scrape-time queries of the database succeeded"
        )
        try:
            with self.db.read_session() as session:
                families = list(self._collect(session))
        except Exception as exc:  # a scrape must still answer (and say the database is down)
            log.warning("metrics: database queries failed", extra={"error": str(exc)})
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _collect(self, session: Session) -> Iterator[GaugeMetricFamily]:
        now = self.clock()
        depth = GaugeMetricFamily(
            f"{PREFIX}_triage_queue_depth",
            "triage jobs not finished, by state (queued, running)",
            labels=["state"],
        )
        rows = dict(
            session.execute(
                select(TriageJob.state, func.count())
                .where(TriageJob.state.in_((JOB_QUEUED, JOB_RUNNING)))
                .group_by(TriageJob.state)
            ).all()
        )
        for state in (JOB_QUEUED, JOB_RUNNING):
            depth.add_metric([state], rows.get(state, 0))
        yield depth
        oldest = session.scalar(
            select(func.min(TriageJob.created_at)).where(TriageJob.state.in_((JOB_QUEUED, JOB_RUNNING)))
        )
        age = GaugeMetricFamily(
            f"{PREFIX}_triage_queue_oldest_age_seconds",
            "age of the oldest unfinished triage job (0 when the queue is empty)",
        )
        age.add_metric([], _age_s(now, oldest))
        yield age
        for backlog in self.backlogs:
            count = GaugeMetricFamily(
                f"{PREFIX}_{backlog.name}_backlog", backlog.help, labels=[backlog.label]
            )
            backlog_age = GaugeMetricFamily(
                f"{PREFIX}_{backlog.name}_backlog_oldest_age_seconds",
                f"age of the oldest item of {backlog.name}_backlog (0 when empty)",
                labels=[backlog.label],
            )
            for key, (n, first) in sorted(backlog.query(session).items()):
                count.add_metric([key], n)
                backlog_age.add_metric([key], _age_s(now, first))
            yield count
            yield backlog_age


def _age_s(now: datetime, then: datetime | None) -> float:
    if then is None:
        return 0.0
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    return max(0.0, (now - then).total_seconds())


class Metrics:
    """One registry for the process: in-process counters/histograms plus the database collector.

    Built in the composition root (``serve``) and handed to the web app, which serves
    :attr:`registry` at ``/metrics``. ``clock`` (UTC datetimes) ends the latency and
    turnaround intervals; tests inject one.
    """

    def __init__(self, db: Database, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.db = db
        self.clock = clock
        self.registry = CollectorRegistry()
        self.images_received = Counter(
            f"{PREFIX}_images_received",
            "images stored (acknowledged C-STORE Success, new instances) by calling AE title",
            ["station"],
            registry=self.registry,
        )
        self.images_quarantined = Counter(
            f"{PREFIX}_images_quarantined",
            "images kept apart because of a UID conflict, by calling AE title",
            ["station"],
            registry=self.registry,
        )
        self.triage_completed = Counter(
            f"{PREFIX}_triage_completed",
            "triage results committed, by priority",
            ["priority"],
            registry=self.registry,
        )
        self.triage_failures = Counter(
            f"{PREFIX}_triage_job_failures",
            "triage jobs failed for good (undecodable image, or max_job_attempts reached), by station",
            ["station"],
            registry=self.registry,
        )
        self.triage_latency = Histogram(
            f"{PREFIX}_triage_latency_seconds",
            "image received (row committed) -> its triage result committed",
            buckets=TRIAGE_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.consult_turnaround = Histogram(
            f"{PREFIX}_consult_turnaround_seconds",
            "consult requested -> answered (each answer: a reply that answers it, or a conclusion), by urgency",
            ["urgency"],
            buckets=CONSULT_TURNAROUND_BUCKETS,
            registry=self.registry,
        )
        self.database = DatabaseCollector(db, clock)
        self.database.add_backlog(DESTINATION_BACKLOG)
        self.registry.register(self.database)

    def attach(self) -> Metrics:
        """Register the event handlers on ``db.events`` (once per process)."""
        events = self.db.events
        events.register(InstanceStored, self.on_instance_stored)
        events.register(InstanceQuarantined, self.on_instance_quarantined)
        events.register(TriageCompleted, self.on_triage_completed)
        events.register(TriageFailed, self.on_triage_failed)
        events.register(ConsultAnswered, self.on_consult_answered)
        return self

    def on_instance_stored(self, event: InstanceStored) -> None:
        self.images_received.labels(station=event.station_ae).inc()

    def on_instance_quarantined(self, event: InstanceQuarantined) -> None:
        self.images_quarantined.labels(station=event.station_ae).inc()

    def on_triage_completed(self, event: TriageCompleted) -> None:
        self.triage_completed.labels(priority=event.priority).inc()
        with self.db.read_session() as session:
            received = session.scalar(select(Instance.received_at).where(Instance.id == event.instance_id))
        if received is not None:
            self.triage_latency.observe(_age_s(self.clock(), received))

    def on_triage_failed(self, event: TriageFailed) -> None:
        self.triage_failures.labels(station=event.station_ae).inc()

    def on_consult_answered(self, event: ConsultAnswered) -> None:
        with self.db.read_session() as session:
            row = session.execute(
                select(Consult.created_at, Consult.urgency).where(Consult.id == event.consult_id)
            ).first()
        if row is not None:
            self.consult_turnaround.labels(urgency=row.urgency or "routine").observe(
                _age_s(self.clock(), row.created_at)
            )
