"""A durable outbox consumer: works off the outbox for one named consumer, in a background thread.

Exporters, result builders and forwarding must not miss an event, so they read the outbox
(``store/outbox.py``) rather than the in-process handlers. ``OutboxConsumer`` is the loop they
share: in one write transaction it ``claim``s the events after the consumer's cursor, calls
``handle(session, stored_event)`` for each, in order, and ``advance``s the cursor, so the
consumer's effect (rows it writes) and its position commit together (at-least-once: a crash
before the commit repeats the batch, so ``handle`` must tolerate a repeat, keyed by event id or
by the UIDs in the payload).

A handler that raises rolls the whole batch back; the loop logs it and tries again after
``retry_s`` (a poison event therefore stops its consumer, visibly in the log, rather than
being skipped silently). A commit of any event in this process wakes the loop at once;
otherwise it polls every ``poll_s`` seconds (events written by other processes).
Keep ``handle`` quick: on SQLite it runs while the transaction holds the one write lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from xray_triage.events import Event
from xray_triage.store import outbox
from xray_triage.store.db import Database
from xray_triage.store.outbox import StoredEvent

log = logging.getLogger(__name__)

Handle = Callable[[Session, StoredEvent], None]


@dataclass(eq=False)
class OutboxConsumer:
    """``name``: the cursor's key in ``outbox_cursors`` (never rename a consumer: it would start over)."""

    db: Database
    name: str
    handle: Handle
    poll_s: float = 1.0
    retry_s: float = 5.0
    batch: int = 100
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _wake: threading.Event = field(default_factory=threading.Event, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)
    _unregister: Callable[[], None] | None = field(default=None, init=False)

    def run_once(self) -> int:
        """Work off one batch; returns how many events were handled (0: up to date, or only unknown types)."""
        with self.db.read_session() as session:  # the common case, nothing new: no write lock taken
            if outbox.latest_id(session) <= outbox.cursor(session, self.name):
                return 0
        with self.db.session() as session:
            events, last_id = outbox.claim(session, self.name, self.batch)
            for stored in events:
                self.handle(session, stored)
            outbox.advance(session, self.name, last_id)
        return len(events)

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
        self._stop.set()
        self._wake.set()
        if self._unregister is not None:
            self._unregister()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

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
            self._wake.clear()
