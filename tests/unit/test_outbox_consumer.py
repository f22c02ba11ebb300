"""``OutboxConsumer`` skips the events it does not want without taking the write lock
(``xray_triage/outbox_consumer.py``), and still hands every wanted event to ``handle`` once.

A real SQLite database in a file (WAL, separate read and write engines, as in production);
events are recorded with ``outbox.record`` as any writer does. Write transactions are counted
with an SQLAlchemy ``begin`` listener on the write engine (each is a ``BEGIN IMMEDIATE``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session

from xray_triage.events import Event, InstanceStored, ReplyPosted, ResultObjectStored, TriageCompleted
from xray_triage.outbox_consumer import OutboxConsumer
from xray_triage.results import producer
from xray_triage.store import deliveries, outbox
from xray_triage.store.db import Database
from xray_triage.store.destinations import DestinationSpec, add_destination
from xray_triage.store.outbox import StoredEvent

NAME = "test-consumer"


@dataclass(eq=False)  # hashable: SQLAlchemy keeps listeners in a dict
class Writes:
    """How many write transactions the database's write engine began."""

    count: int = 0

    def __call__(self, _conn: object) -> None:
        self.count += 1


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Handled:
    """``handle``: records the ids of the events it is given (its "effect")."""

    ids: list[int] = field(default_factory=list)

    def __call__(self, _session: Session, stored: StoredEvent) -> None:
        self.ids.append(stored.id)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'outbox.db'}")
    database.create_schema()
    yield database
    database.dispose()


@pytest.fixture
def writes(db: Database) -> Iterator[Writes]:
    counter = Writes()
    sa_event.listen(db.engine, "begin", counter)
    yield counter
    sa_event.remove(db.engine, "begin", counter)


def _image(n: int) -> InstanceStored:
    return InstanceStored("1.2.3", "STATION1", f"1.2.3.4.{n}", "1.2.3.4", n, True)


def _triaged(n: int) -> TriageCompleted:
    return TriageCompleted("1.2.3", "STATION1", f"1.2.3.4.{n}", n, "urgent", ("Effusion",))


def _record(db: Database, *events: Event) -> list[int]:
    """Commit each event in a transaction of its own; returns their outbox ids."""
    ids = []
    for event in events:
        with db.session() as session:
            outbox.record(session, event)
        with db.read_session() as session:
            ids.append(outbox.latest_id(session))
    return ids


def _cursor(db: Database, name: str = NAME) -> int:
    with db.read_session() as session:
        return outbox.cursor(session, name)


def _wants_triage(_session: Session, event: Event) -> bool:
    return isinstance(event, TriageCompleted)


def _consumer(db: Database, handled: Handled, **kwargs) -> OutboxConsumer:  # type: ignore[no-untyped-def]
    return OutboxConsumer(
        db, NAME, handled, wants=_wants_triage, clock=kwargs.pop("clock", Clock()), **kwargs
    )


def test_a_batch_of_unwanted_events_takes_no_write_transaction(db: Database, writes: Writes) -> None:
    ids = _record(db, *(_image(n) for n in range(5)))
    handled = Handled()
    consumer = _consumer(db, handled)
    writes.count = 0
    assert consumer.run_once() == 0
    assert writes.count == 0  # no BEGIN IMMEDIATE: the gateway's commits never waited on this consumer
    assert consumer.position == ids[-1] and handled.ids == []
    assert _cursor(db) == 0  # the stored cursor lags; the skipped events are harmless to read again


def test_a_wanted_event_after_skipped_ones_is_handled_once_and_the_cursor_then_covers_them(
    db: Database, writes: Writes
) -> None:
    handled = Handled()
    consumer = _consumer(db, handled)
    skipped = _record(db, _image(1), _image(2), _image(3))
    assert consumer.run_once() == 0
    [wanted, after] = _record(db, _triaged(4), _image(5))
    writes.count = 0
    assert consumer.run_once() == 2  # the claimed batch: the wanted event and what follows it
    assert writes.count == 1  # claim, handle and advance in one transaction, as before
    assert handled.ids == [wanted, after]  # the skipped ones never reach handle
    assert _cursor(db) == after > skipped[-1]
    assert consumer.drain() == 0 and handled.ids == [wanted, after] and writes.count == 1


def test_a_position_too_far_ahead_is_written_without_waiting_for_a_wanted_event(
    db: Database, writes: Writes
) -> None:
    ids = _record(db, *(_image(n) for n in range(5)))
    consumer = _consumer(db, Handled(), persist_events=3)
    writes.count = 0
    assert consumer.run_once() == 0
    assert writes.count == 1 and _cursor(db) == ids[-1]  # 5 ids ahead >= 3: written
    _record(db, _image(6))
    writes.count = 0
    assert consumer.run_once() == 0
    assert writes.count == 0 and _cursor(db) == ids[-1]  # 1 ahead: kept in memory


def test_a_position_ahead_for_persist_s_is_written(db: Database, writes: Writes) -> None:
    clock = Clock()
    consumer = _consumer(db, Handled(), clock=clock, persist_s=60.0)
    [only] = _record(db, _image(1))
    writes.count = 0
    assert consumer.run_once() == 0
    clock.now += 59.0
    assert consumer.run_once() == 0  # nothing new, not yet due
    assert writes.count == 0 and _cursor(db) == 0
    clock.now += 1.0
    assert consumer.run_once() == 0
    assert writes.count == 1 and _cursor(db) == only
    assert consumer.run_once() == 0 and writes.count == 1  # written once, not on every poll after


def test_stop_writes_the_position(db: Database) -> None:
    ids = _record(db, _image(1), _image(2))
    consumer = _consumer(db, Handled())
    assert consumer.run_once() == 0 and _cursor(db) == 0  # skipped in memory
    consumer.start()
    consumer.stop()
    assert _cursor(db) == ids[-1]


def test_a_restart_reads_the_skipped_events_again_and_handles_nothing_twice(db: Database) -> None:
    first = Handled()
    consumer = _consumer(db, first)
    [wanted] = _record(db, _triaged(1))
    _record(db, _image(2), _image(3))
    assert consumer.drain() == 3 and first.ids == [wanted, wanted + 1, wanted + 2]
    late_skipped = _record(db, _image(4), _image(5))
    assert consumer.run_once() == 0 and consumer.position == late_skipped[-1]
    # a crash: the in-memory position is lost, the stored cursor lags behind it
    assert _cursor(db) == wanted + 2
    second = Handled()
    restarted = _consumer(db, second)
    assert restarted.drain() == 0 and second.ids == []  # read again, skipped again
    [later] = _record(db, _triaged(6))
    assert restarted.drain() == 1 and second.ids == [later]
    assert first.ids + second.ids == [wanted, wanted + 1, wanted + 2, later]  # each once


def test_a_copy_ahead_in_memory_never_moves_the_cursor_back(db: Database) -> None:
    """Two processes, one consumer name: the claim under the write lock decides, so a copy's
    in-memory skipping neither hands an event out twice nor undoes the other copy's progress."""
    ahead, behind = Handled(), Handled()
    a = _consumer(db, ahead)
    b = OutboxConsumer(db, NAME, behind)  # wants everything
    ids = _record(db, _image(1), _image(2))
    assert a.run_once() == 0  # a skipped both in memory
    ids += _record(db, _triaged(3), _image(4))
    assert b.drain() == 4 and behind.ids == ids  # b works them all off and commits the cursor
    a.persist()  # a's position (2) is behind the stored cursor now: nothing moves back
    assert _cursor(db) == ids[-1]
    assert a.drain() == 0 and ahead.ids == []  # a does not take the triage event again


def test_the_results_consumer_wants_only_what_it_acts_on() -> None:
    wants = producer.wants
    session = None  # the results consumer decides on the event alone
    assert wants(session, _triaged(1))  # type: ignore[arg-type]
    assert not wants(session, _image(1))  # type: ignore[arg-type]
    assert wants(session, ReplyPosted("1.2.3", "STATION1", 1, 2, 3, "answered"))  # type: ignore[arg-type]
    assert not wants(session, ReplyPosted("1.2.3", "STATION1", 1, 2, 3, "open"))  # type: ignore[arg-type]


def test_delivery_skips_images_until_a_destination_takes_them_and_queues_every_one_after(
    db: Database, writes: Writes
) -> None:
    queued: list[int] = []

    def enqueue(session: Session, stored: StoredEvent) -> None:
        queued.extend([stored.id] * deliveries.enqueue(session, stored))

    consumer = OutboxConsumer(db, "delivery", enqueue, wants=deliveries.wanted)
    ai_object = ResultObjectStored(
        "1.2.3", "STATION1", "1.2.3.9", "1.2.840.10008.5.1.4.1.1.88.34", "ai-results"
    )
    before = _record(db, _image(1), ai_object)
    writes.count = 0
    assert consumer.run_once() == 0 and writes.count == 0  # no destination: nothing to queue
    with db.session() as session:
        add_destination(session, DestinationSpec("pacs", "TESTPACS", "127.0.0.1", 104, ("images",)))
    [image] = _record(db, _image(2))
    [result] = _record(
        db, ResultObjectStored("1.2.3", "STATION1", "1.2.3.10", ai_object.sop_class_uid, "ai-results")
    )
    writes.count = 0
    assert consumer.drain() == 2  # one claimed batch: the image and the AI result after it, handed to enqueue
    # queued: the image stored after the destination came, not the AI result it does not take
    assert writes.count == 1 and queued == [image]
    assert consumer.position == result and before[-1] < image
