"""The durable outbox: every domain event, written in the transaction of the change that raised it.

Two tables. ``outbox_events`` holds the events in order: ``id`` (monotonic, never reused),
``created_at``, ``type`` (``xray_triage.events``), ``study_uid`` and ``station_ae`` (columns, so
readers filter without parsing JSON) and the JSON ``payload``. ``outbox_cursors`` holds, per
named consumer, the id of the last event it has worked off.

Claim semantics (at-least-once, in order): a consumer opens a write transaction
(``Database.session()``), ``claim``s the events after its cursor, does its own effect and
``advance``s its cursor in that same transaction. If it crashes before the commit, neither its
effect nor its cursor moved and it gets the same events again; so its effect must tolerate a
repeat (keyed by event id or by the UIDs in the payload). Consumers are independent: each has
its own cursor, and none deletes events.

Ids are in commit order, so a reader that remembers "up to id N" never skips an event: on
SQLite every write transaction holds the one write lock from BEGIN (``db.py``) and
``AUTOINCREMENT`` never reuses an id; on PostgreSQL ``record`` takes a self-excluding table
lock (SHARE ROW EXCLUSIVE, readers are not blocked) until the commit, so an event with a lower
id is never committed after one with a higher id (not yet tested against a PostgreSQL server).

``record`` also keeps the event on the session; once the transaction commits, the session's
``EventHandlers`` (``session.info["event_handlers"]``, set by ``Database``) are called with it.
A rolled-back transaction drops its events, recorded and pending alike.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Integer, String, event, func, insert, select, text
from sqlalchemy.orm import Mapped, Session, mapped_column

from xray_triage.events import Event, EventHandlers, UnknownEvent, decode
from xray_triage.store.schema import Base, UTCDateTime, utcnow

log = logging.getLogger(__name__)

HANDLERS_KEY = "event_handlers"
_PENDING_KEY = "pending_events"


class OutboxEvent(Base):
    """One domain event, in the order the changes were committed."""

    __tablename__ = "outbox_events"
    __table_args__ = {"sqlite_autoincrement": True}  # ids are never reused, even after pruning

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, nullable=False)
    type: Mapped[str] = mapped_column(String(64), nullable=False)
    study_uid: Mapped[str] = mapped_column(String(64), nullable=False)
    station_ae: Mapped[str] = mapped_column(String(16), nullable=False)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)


class OutboxCursor(Base):
    """How far one consumer has worked off the outbox."""

    __tablename__ = "outbox_cursors"

    consumer: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_id: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


@dataclass(frozen=True)
class StoredEvent:
    """An event as read back from the outbox: its id (the position consumers advance to) and time."""

    id: int
    created_at: datetime
    event: Event


_INSERT_EVENT = insert(OutboxEvent.__table__)


def record(session: Session, event: Event) -> None:
    """Add ``event`` to the outbox in ``session``'s transaction (committed or rolled back with the change)."""
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        session.execute(text(f"LOCK TABLE {OutboxEvent.__tablename__} IN SHARE ROW EXCLUSIVE MODE"))
    # A prepared Core INSERT, not an ORM object: written for every received image.
    session.connection().execute(
        _INSERT_EVENT,
        {
            "type": event.type,
            "study_uid": event.study_uid,
            "station_ae": event.station_ae,
            "payload": event.payload(),
        },
    )
    session.info.setdefault(_PENDING_KEY, []).append(event)


def latest_id(session: Session) -> int:
    """The id of the newest committed event, 0 when there is none."""
    return session.scalar(select(func.max(OutboxEvent.id))) or 0


def read_after(session: Session, after_id: int, limit: int = 1000) -> tuple[list[StoredEvent], int]:
    """Up to ``limit`` events with an id above ``after_id``, oldest first, and where to continue.

    The second value is the id of the last row read (``after_id`` when none). Rows of an
    unknown type (written by a newer version) are skipped with a warning but still counted
    in it, so a reader never stops on them.
    """
    rows = _rows_after(session, after_id, limit)
    return _decoded(rows), (rows[-1].id if rows else after_id)


def _rows_after(session: Session, after_id: int, limit: int) -> list[OutboxEvent]:
    return list(
        session.scalars(
            select(OutboxEvent).where(OutboxEvent.id > after_id).order_by(OutboxEvent.id).limit(limit)
        )
    )


def _decoded(rows: list[OutboxEvent]) -> list[StoredEvent]:
    events = []
    for row in rows:
        try:
            events.append(StoredEvent(row.id, row.created_at, decode(row.type, row.payload)))
        except UnknownEvent as exc:
            log.warning("outbox event skipped", extra={"event_id": row.id, "error": str(exc)})
    return events


def cursor(session: Session, consumer: str) -> int:
    """The id of the last event ``consumer`` has worked off (0: none yet)."""
    return session.scalar(select(OutboxCursor.last_id).where(OutboxCursor.consumer == consumer)) or 0


def claim(session: Session, consumer: str, limit: int = 100, after: int = 0) -> tuple[list[StoredEvent], int]:
    """The next events for ``consumer`` and the id to ``advance`` to once they are worked off.

    Call it in the consumer's write transaction; the cursor row is read ``FOR UPDATE`` (on
    SQLite the transaction already holds the write lock), so two copies of one consumer do not
    work off the same events at once. ``after``: an id the consumer already knows it is past
    (events it skipped without a write, ``outbox_consumer.py``); the events start after the
    greater of it and the stored cursor, never before the stored cursor.
    """
    return read_after(session, max(_locked_cursor(session, consumer), after), limit)


def _locked_cursor(session: Session, consumer: str) -> int:
    row = session.scalar(select(OutboxCursor).where(OutboxCursor.consumer == consumer).with_for_update())
    return row.last_id if row is not None else 0


def skip_to(session: Session, consumer: str, last_id: int) -> None:
    """Move ``consumer``'s cursor forward to ``last_id`` (never back) with nothing else to commit:
    the events up to it were read and found to be none of the consumer's business. The row is
    locked first, as in ``claim``, so a copy that moved it further meanwhile is not undone."""
    _locked_cursor(session, consumer)
    advance(session, consumer, last_id)


def advance(session: Session, consumer: str, last_id: int) -> None:
    """Move ``consumer``'s cursor to ``last_id`` in this transaction (with the consumer's own effect)."""
    row = session.get(OutboxCursor, consumer)
    if row is None:
        session.add(OutboxCursor(consumer=consumer, last_id=last_id))
    elif last_id > row.last_id:
        row.last_id = last_id


@event.listens_for(Session, "after_commit")
def _dispatch_after_commit(session: Session) -> None:
    pending: list[Event] = session.info.pop(_PENDING_KEY, [])
    handlers: EventHandlers | None = session.info.get(HANDLERS_KEY)
    if pending and handlers is not None:
        handlers.dispatch(pending)


@event.listens_for(Session, "after_rollback")
def _drop_after_rollback(session: Session) -> None:
    session.info.pop(_PENDING_KEY, None)
