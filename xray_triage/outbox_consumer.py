"""A durable outbox consumer: works off the outbox for one named consumer, in a background thread.

Exporters, result builders and forwarding must not miss an event, so they read the outbox
(``store/outbox.py``) rather than the in-process handlers. ``OutboxConsumer`` is the loop they
share: in one write transaction it ``claim``s the events after the consumer's cursor, calls
``handle(session, stored_event)`` for each, in order, and ``advance``s the cursor, so the
consumer's effect (rows it writes) and its position commit together (at-least-once: a crash
before the commit repeats the batch, so ``handle`` must tolerate a repeat, keyed by event id or
by the UIDs in the payload).

Skipping without the write lock. Most events are none of a given consumer's business (every
received image raises ``InstanceStored``; the results consumer acts on none of them, delivery
only when a destination wants images), and on SQLite a write transaction is the one write lock
that the gateway's ingest commits also wait for, plus a WAL fsync at its commit. So the events
are first read in a read session (``Database.read_session``, no lock) and shown to ``wants``;
when none of them is wanted, the consumer only moves its position in memory. That position is
written to the cursor (a) by the next write transaction, which claims from the greater of the
two (``outbox.claim(after=...)``) and so advances the cursor at least that far, (b) by a
write of its own (``outbox.skip_to``) once it is ``persist_events`` ids or ``persist_s``
seconds (``clock``) ahead of the stored cursor, and (c) at ``stop`` (best effort). A crash
loses at most that lag: on restart the skipped events are read again and, unwanted still,
skipped again. Should a skipped event be wanted after a restart (a destination added between),
it is handled then, as it would have been had the consumer lagged that far behind in the
first place; so the lag is bounded, not zero.

``wants(session, event)`` is a hint, never the decision: it is called in the read session that
read the events (after reading them, so anything it reads there was committed no later than
those events: a destination added before an event is seen by the call that judges it), it must
say True for every event ``handle`` would act on (a wrong False loses that event for this
consumer; a wrong True only costs a write transaction), and ``handle`` is still called for every
event of a claimed batch, wanted or not, deciding for itself as it always did. Leaving ``wants``
out wants everything: one write transaction per batch, as before.

Two copies of one consumer (two processes) still never handle an event twice: the claim in the
write transaction, which locks the cursor row (on SQLite the whole database), is the only place
an event is handed to ``handle``, it starts after the stored cursor as it stands under that
lock, and it commits the cursor past what it handed out. What a copy knows only in memory can
move its own claims further forward (past events it found unwanted), never back behind the
stored cursor, and ``skip_to`` never moves the cursor back.

A handler that raises rolls the whole batch back; the loop logs it and tries again after
``retry_s`` (a poison event therefore stops its consumer, visibly in the log, rather than
being skipped silently). A commit of any event in this process wakes the loop,
at most once per ``min_interval_s`` (a gateway commits many times a second under load, and a
consumer that read the outbox after every commit cost the gateway's interpreter a third of
its CPU, issue 17: the events of that interval are read in one go instead); otherwise it
polls every ``poll_s`` seconds (events written by other processes).
Keep ``handle`` quick: on SQLite it runs while the transaction holds the one write lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from xray_triage.events import Event
from xray_triage.store import outbox
from xray_triage.store.db import Database
from xray_triage.store.outbox import StoredEvent

log = logging.getLogger(__name__)

Handle = Callable[[Session, StoredEvent], None]
Wants = Callable[[Session, Event], bool]


def wants_everything(_session: Session, _event: Event) -> bool:
    return True


@dataclass(eq=False)
class OutboxConsumer:
    """``name``: the cursor's key in ``outbox_cursors`` (never rename a consumer: it would start over).

    ``wants``: which events need a write transaction (module docstring); ``read_batch``: how many
    events one lock-free read looks at; ``persist_events`` (outbox ids) and ``persist_s`` (seconds
    of ``clock``, a monotonic clock in seconds): how far the in-memory position may run ahead of
    the stored cursor before it is written.
    """

    db: Database
    name: str
    handle: Handle
    poll_s: float = 1.0
    min_interval_s: float = 0.2
    retry_s: float = 5.0
    batch: int = 100
    wants: Wants = wants_everything
    read_batch: int = 1000
    persist_events: int = 1000
    persist_s: float = 60.0
    clock: Callable[[], float] = time.monotonic
    # Called with the next wanted event before the write transaction that hands it to ``handle``
    # (outside any transaction): slow work that needs no lock goes here (``AiResultsAhead``).
    prepare: Callable[[StoredEvent], None] | None = None
    _position: int = field(default=0, init=False)  # every event up to this id is worked off or skipped
    _stored: int = field(default=0, init=False)  # the stored cursor as last read or written
    _ahead_since: float | None = field(default=None, init=False)  # clock() when _position passed _stored
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _wake: threading.Event = field(default_factory=threading.Event, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)
    _unregister: Callable[[], None] | None = field(default=None, init=False)

    @property
    def position(self) -> int:
        """The id up to which every event is worked off or skipped (>= the stored cursor once read)."""
        return self._position

    def run_once(self) -> int:
        """Skip what is not wanted, then work off one batch; returns how many events were handed to
        ``handle`` (0: up to date, nothing wanted). Raises what ``handle`` or the database raises."""
        while True:
            with self.db.read_session() as session:  # no write lock for reading, nor for skipping
                self._stored = outbox.cursor(session, self.name)
                start = max(self._stored, self._position)
                events, last_id = outbox.read_after(session, start, max(self.read_batch, self.batch))
                wanted = next((stored for stored in events if self.wants(session, stored.event)), None)
            if wanted is not None:
                self._moved_to(max(start, wanted.id - 1))  # the unwanted ones before it are skipped
                if self.prepare is not None:
                    self.prepare(wanted)
                return self._work_off()
            if last_id == start:  # up to date
                self._moved_to(start)
                self._persist_if_due()
                return 0
            self._moved_to(last_id)
            self._persist_if_due()
            if self._stop.is_set():  # a long unwanted tail: stop() need not wait for all of it
                return 0

    def _work_off(self) -> int:
        with self.db.session() as session:
            events, last_id = outbox.claim(session, self.name, self.batch, after=self._position)
            for stored in events:
                self.handle(session, stored)
            outbox.advance(session, self.name, last_id)
        self._stored = max(self._stored, last_id)
        self._moved_to(last_id)
        return len(events)

    def _moved_to(self, position: int) -> None:
        self._position = max(self._position, position)
        if self._position <= self._stored:
            self._ahead_since = None
        elif self._ahead_since is None:
            self._ahead_since = self.clock()

    def _persist_if_due(self) -> None:
        if self._ahead_since is None:
            return
        if (
            self._position - self._stored >= self.persist_events
            or self.clock() - self._ahead_since >= self.persist_s
        ):
            self.persist()

    def persist(self) -> None:
        """Write the in-memory position to the cursor now (nothing to do when it is not ahead)."""
        if self._position <= self._stored:
            return
        position = self._position
        with self.db.session() as session:
            outbox.skip_to(session, self.name, position)
        self._stored = position
        self._moved_to(position)

    def drain(self) -> int:
        """Run batches until none is left (tests, start-up); returns the events handled."""
        total = 0
        while handled := self.run_once():
            total += handled
        return total

    def start(self) -> None:
        """Start the background thread (a daemon; ``stop`` ends it)."""
        if self._thread is not None:
            return
        self._unregister = self.db.events.register(Event, lambda _event: self._wake.set())
        self._thread = threading.Thread(target=self._run, name=f"outbox-{self.name}", daemon=True)
        self._thread.start()
        log.info("outbox consumer started", extra={"consumer": self.name})

    def stop(self, timeout_s: float = 10.0) -> None:
        """End the thread, then write the in-memory position (best effort: a failure is logged,
        and the next start reads the skipped events again)."""
        self._stop.set()
        self._wake.set()
        if self._unregister is not None:
            self._unregister()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                return  # still in a batch: writing the position now would race it
            self._thread = None
        try:
            self.persist()
        except Exception:
            log.warning(
                "outbox consumer position not saved at stop", exc_info=True, extra={"consumer": self.name}
            )

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                handled = self.run_once()
            except Exception:
                log.exception("outbox consumer failed; retrying", extra={"consumer": self.name})
                self._stop.wait(self.retry_s)
                continue
            if handled:
                continue  # more may be waiting
            self._wake.wait(self.poll_s)
            self._stop.wait(self.min_interval_s)  # let this interval's commits gather
            self._wake.clear()
