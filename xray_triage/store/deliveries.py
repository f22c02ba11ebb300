"""The durable send queue to PACS destinations: queue, pick what is due, record the outcome.

Queueing (``enqueue``) is the ``handle`` of the ``delivery`` outbox consumer
(``xray_triage/outbox_consumer.py``): it runs in the transaction that also advances the
consumer's cursor, so an object's queue rows and "this event is done" commit together. A
crash before that commit repeats the event; the rows are keyed on destination + SOP Instance
UID + version, so a repeat adds nothing.

The sender (``dicom_sender/``) asks ``due`` for the rows whose time has come, most urgent study
first (the study's current triage priority, ``xray_triage/priority.py``; then oldest first),
sends them and records each outcome in its own short transaction: ``mark_sent`` after the peer's
Success (or warning) status, ``mark_failed`` otherwise, which pushes the row back by an
exponential back-off (``backoff_s``) and never gives up. ``peer_failed`` backs off the whole
destination when it cannot even be reached. Every function takes ``now`` (an injected clock),
so tests never wait on the wall clock.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import case, select
from sqlalchemy.orm import Session

from xray_triage.events import Event, InstanceStored, ResultObjectStored
from xray_triage.store.delivery_schema import (
    CATEGORY_IMAGES,
    DELIVERY_PENDING,
    DELIVERY_SENT,
    Delivery,
    Destination,
)
from xray_triage.store.outbox import StoredEvent
from xray_triage.store.result_objects import ResultObject
from xray_triage.store.schema import Instance, Study

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 500
_WANTED_KEY = "delivery_wanted_categories"  # session.info: the categories some destination wants


def backoff_s(failures: int, initial_s: float, max_s: float) -> float:
    """Seconds to wait after the ``failures``-th failure in a row: ``initial_s`` doubled per further
    failure, at most ``max_s`` (1 -> initial, 2 -> 2x initial, ...); 0 for no failure."""
    if failures <= 0:
        return 0.0
    return min(max_s, initial_s * 2 ** min(failures - 1, 62))


def _category_and_uid(event: Event) -> tuple[str, str] | None:
    if isinstance(event, InstanceStored):
        return CATEGORY_IMAGES, event.sop_instance_uid
    if isinstance(event, ResultObjectStored):
        return event.category, event.sop_instance_uid
    return None


def wanted(session: Session, event: Event) -> bool:
    """Whether ``enqueue`` could queue anything for ``event``: it carries an object (an image, a
    result object) of a category that some destination wants, as the destinations stand in
    ``session``. The delivery consumer's ``wants`` (``outbox_consumer.py``): events it says False
    for are skipped without a write transaction. The categories are read once per session, i.e.
    once per batch of events read."""
    found = _category_and_uid(event)
    if found is None:
        return False
    categories: set[str] | None = session.info.get(_WANTED_KEY)
    if categories is None:
        categories = {category for d in session.scalars(select(Destination)) for category in d.categories}
        session.info[_WANTED_KEY] = categories
    return found[0] in categories


def enqueue(session: Session, stored: StoredEvent, now: datetime | None = None) -> int:
    """Queue the object of ``stored`` for every destination that wants its category; returns rows added.

    Idempotent: a row that exists (same destination, SOP Instance UID, version 0) is left alone.
    Events of other types add nothing.
    """
    found = _category_and_uid(stored.event)
    if found is None:
        return 0
    category, sop_uid = found
    added = 0
    for destination in session.scalars(select(Destination).order_by(Destination.id)):
        if category not in destination.categories:
            continue
        exists = session.scalar(
            select(Delivery.id).where(
                Delivery.destination_id == destination.id,
                Delivery.sop_instance_uid == sop_uid,
                Delivery.version == 0,
            )
        )
        if exists is not None:
            continue
        row = Delivery(
            destination_id=destination.id,
            sop_instance_uid=sop_uid,
            study_uid=stored.event.study_uid,
            category=category,
            event_id=stored.id,
            state=DELIVERY_PENDING,
        )
        if now is not None:
            row.created_at = row.next_attempt_at = now
        session.add(row)
        added += 1
    if added:
        session.flush()
    return added


@dataclass(frozen=True)
class DueObject:
    """A queued object and where its file is (``file_path`` relative to the data directory; None when
    the store has no such object, e.g. deleted since)."""

    delivery_id: int
    sop_instance_uid: str
    study_uid: str
    category: str
    attempts: int
    file_path: str | None
    sop_class_uid: str | None
    transfer_syntax_uid: str | None
    file_size: int


def due(session: Session, destination_id: int, now: datetime, limit: int) -> list[DueObject]:
    """Up to ``limit`` pending rows of the destination due at ``now``: urgent studies first (the
    study's current priority rank), then objects never tried before those that failed (so one the
    peer chokes on cannot hold up the rest), then in queueing order. Empty while the destination
    itself is backed off (``peer_failed``)."""
    destination = session.get(Destination, destination_id)
    if destination is None or (destination.next_attempt_at is not None and destination.next_attempt_at > now):
        return []
    rows = session.execute(
        select(Delivery, Instance, ResultObject)
        .outerjoin(Study, Study.study_instance_uid == Delivery.study_uid)
        .outerjoin(Instance, Instance.sop_instance_uid == Delivery.sop_instance_uid)
        .outerjoin(ResultObject, ResultObject.sop_instance_uid == Delivery.sop_instance_uid)
        .where(
            Delivery.destination_id == destination_id,
            Delivery.state == DELIVERY_PENDING,
            Delivery.next_attempt_at <= now,
        )
        .order_by(
            Study.priority_rank.desc().nulls_last(),
            case((Delivery.attempts > 0, 1), else_=0),  # an object that failed before goes after fresh ones
            Delivery.id,
        )
        .limit(limit)
    ).all()
    return [_due_object(row, instance or result) for row, instance, result in rows]


def _due_object(row: Delivery, stored: Instance | ResultObject | None) -> DueObject:
    """Where the object is: a received instance or an object we made (``result_objects``)."""
    return DueObject(
        delivery_id=row.id,
        sop_instance_uid=row.sop_instance_uid,
        study_uid=row.study_uid,
        category=row.category,
        attempts=row.attempts,
        file_path=stored.file_path if stored is not None else None,
        sop_class_uid=stored.sop_class_uid if stored is not None else None,
        transfer_syntax_uid=stored.transfer_syntax_uid if stored is not None else None,
        file_size=(stored.file_size or 0) if stored is not None else 0,
    )


def next_due_at(session: Session, destination_id: int) -> datetime | None:
    """When the destination's next pending row becomes due (None: nothing pending)."""
    destination = session.get(Destination, destination_id)
    if destination is None:
        return None
    first = session.scalar(
        select(Delivery.next_attempt_at)
        .where(Delivery.destination_id == destination_id, Delivery.state == DELIVERY_PENDING)
        .order_by(Delivery.next_attempt_at)
        .limit(1)
    )
    if first is None:
        return None
    if destination.next_attempt_at is not None and destination.next_attempt_at > first:
        return destination.next_attempt_at
    return first


def mark_sent(session: Session, delivery_id: int, status: int, now: datetime) -> None:
    """The peer acknowledged the object (``status``: 0x0000 or a warning): never send it again."""
    row = session.get(Delivery, delivery_id)
    if row is None:  # the destination was removed meanwhile
        return
    row.state, row.sent_at, row.sent_status = DELIVERY_SENT, now, status
    row.attempts += 1
    row.last_error = None
    _peer_ok(session, row.destination_id, now)


def mark_failed(
    session: Session,
    delivery_id: int,
    error: str,
    now: datetime,
    *,
    initial_s: float,
    max_s: float,
    peer_error: bool = True,
) -> datetime | None:
    """The object was refused or its send failed: try again after the row's back-off; returns when.
    ``peer_error``: also count it against the destination (False when ``peer_failed`` does so)."""
    row = session.get(Delivery, delivery_id)
    if row is None:
        return None
    row.attempts += 1
    row.last_error = error[:MAX_ERROR_CHARS]
    row.next_attempt_at = now + timedelta(seconds=backoff_s(row.attempts, initial_s, max_s))
    if peer_error:
        _peer_error(session, row.destination_id, error, now)
    return row.next_attempt_at


def peer_failed(
    session: Session, destination_id: int, error: str, now: datetime, *, initial_s: float, max_s: float
) -> datetime | None:
    """The destination could not be reached or dropped the association: back the peer off (its rows
    keep their own times); returns when it is tried again."""
    destination = _peer_error(session, destination_id, error, now)
    if destination is None:
        return None
    destination.next_attempt_at = now + timedelta(
        seconds=backoff_s(destination.consecutive_failures, initial_s, max_s)
    )
    return destination.next_attempt_at


def _peer_error(session: Session, destination_id: int, error: str, now: datetime) -> Destination | None:
    destination = session.get(Destination, destination_id)
    if destination is None:
        return None
    destination.consecutive_failures += 1
    destination.failing_since = destination.failing_since or now
    destination.last_error = error[:MAX_ERROR_CHARS]
    destination.last_error_at = now
    return destination


def _peer_ok(session: Session, destination_id: int, now: datetime) -> None:
    destination = session.get(Destination, destination_id)
    if destination is None:
        return
    destination.consecutive_failures = 0
    destination.failing_since = None
    destination.next_attempt_at = None
    destination.last_success_at = now


def pending_count(session: Session, destination_id: int | None = None) -> int:
    query = select(Delivery.id).where(Delivery.state == DELIVERY_PENDING)
    if destination_id is not None:
        query = query.where(Delivery.destination_id == destination_id)
    return len(session.scalars(query).all())


def destination_ids(session: Session) -> list[int]:
    return list(session.scalars(select(Destination.id).order_by(Destination.id)))
