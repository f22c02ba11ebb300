"""Domain events: what happened to an image, a study, a consult or a mark, and who is told.

Each event is a frozen dataclass with a stable ``type`` name (kept in the outbox table, so
never renamed) and a JSON payload made of its fields: the UIDs, the station's AE title and
row ids a consumer needs to find the rest in the database, never patient text. Every event
names its study (``study_uid``) and the station that owns it (``station_ae``), which is what
decides who may be told of it (a station user sees only its own station's studies).

Events are recorded durably by ``xray_triage.store.outbox.record`` in the transaction of the
change that raised them. After that transaction commits, the in-process handlers registered
on an ``EventHandlers`` registry (``Database.events``) are called with them: a fast path for
things like waking the live-update poller. Consumers that must not miss an event (exporters,
forwarding, notifications) read the outbox instead (``outbox.claim`` / ``outbox.advance``).

Another process of the same server (a receiver process, ``gateway_processes`` > 1) commits
events that this process's handlers must also see, e.g. to wake the triage workers at once
rather than at their next poll: it registers an :class:`EventRelay` for every event, which
writes each committed event as one line (:func:`relay_line`) to a pipe; this process reads the
lines back (:func:`relayed`) and calls its own ``EventHandlers.dispatch`` with them.

This module is pure Python (no database, no web): every layer of the core may raise events.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Literal, TypeVar

log = logging.getLogger(__name__)

EVENT_TYPES: dict[str, type[Event]] = {}


class UnknownEvent(ValueError):
    """An outbox row whose type or payload this version does not know (written by a newer one)."""


@dataclass(frozen=True)
class Event:
    """Base of every event. ``study_uid``: Study Instance UID (0020,000D); ``station_ae``: the
    calling AE title of the station whose study it is."""

    type: ClassVar[str] = ""

    study_uid: str
    station_ae: str

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.type:
            raise TypeError(f"{cls.__name__} needs a stable type name")
        if cls.type in EVENT_TYPES:
            raise TypeError(
                f"event type {cls.type!r} is used twice ({EVENT_TYPES[cls.type].__name__}, {cls.__name__})"
            )
        EVENT_TYPES[cls.type] = cls

    def payload(self) -> dict[str, Any]:
        """The fields as JSON values (tuples become lists)."""
        return {
            key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()
        }


def decode(event_type: str, payload: Mapping[str, Any]) -> Event:
    """The typed event of an outbox row; ``UnknownEvent`` for a type or payload this version cannot read."""
    cls = EVENT_TYPES.get(event_type)
    if cls is None:
        raise UnknownEvent(f"unknown event type {event_type!r}")
    names = {f.name for f in fields(cls)}
    try:
        return cls(**{key: value for key, value in payload.items() if key in names})
    except TypeError as exc:
        raise UnknownEvent(f"{event_type}: {exc}") from None


# --- images and triage -------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceStored(Event):
    """A received instance was filed into its study (not a duplicate, not quarantined)."""

    type: ClassVar[str] = "instance.stored"

    sop_instance_uid: str
    series_uid: str
    instance_id: int
    triage_queued: bool


@dataclass(frozen=True)
class InstanceQuarantined(Event):
    """A received instance was kept apart (see ``store/placement.py`` for the reasons); in no study.
    ``study_uid`` is the one it carried, ``station_ae`` the station that sent it."""

    type: ClassVar[str] = "instance.quarantined"

    sop_instance_uid: str
    quarantine_id: int
    reason: str


@dataclass(frozen=True)
class TriageCompleted(Event):
    """The model's result for one image is stored; ``priority`` is the image's (``xray_triage.priority``)."""

    type: ClassVar[str] = "triage.completed"

    sop_instance_uid: str
    instance_id: int
    priority: str
    flagged: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "flagged", tuple(self.flagged))  # a list from a JSON payload


@dataclass(frozen=True)
class TriageFailed(Event):
    """Triage of one image failed for good; ``reason`` is what users see (names the image, no path)."""

    type: ClassVar[str] = "triage.failed"

    sop_instance_uid: str
    instance_id: int
    reason: str


# --- consults ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConsultRequested(Event):
    type: ClassVar[str] = "consult.requested"

    consult_id: int
    urgency: str


@dataclass(frozen=True)
class ConsultClaimed(Event):
    type: ClassVar[str] = "consult.claimed"

    consult_id: int
    specialist_id: int


@dataclass(frozen=True)
class ReplyPosted(Event):
    """A message on a consult's thread; ``status`` is the consult's status after it."""

    type: ClassVar[str] = "consult.reply_posted"

    consult_id: int
    message_id: int
    author_id: int
    status: str


@dataclass(frozen=True)
class ConsultAnswered(Event):
    """A specialist recorded a conclusion (``consult_schema.CONCLUSIONS``)."""

    type: ClassVar[str] = "consult.answered"

    consult_id: int
    conclusion: str


@dataclass(frozen=True)
class ConsultClosed(Event):
    type: ClassVar[str] = "consult.closed"

    consult_id: int


# --- annotations -----------------------------------------------------------------------------

AnnotationChange = Literal["create", "update", "delete"]


@dataclass(frozen=True)
class AnnotationChanged(Event):
    """A mark on one of the study's images was created, edited or deleted."""

    type: ClassVar[str] = "annotation.changed"

    annotation_id: int
    change: AnnotationChange


# --- results we made -------------------------------------------------------------------------

ResultCategory = Literal["ai-results", "consult-results"]


@dataclass(frozen=True)
class ResultObjectStored(Event):
    """A DICOM object this server made (an AI SR or GSPS, a specialist's GSPS or consult SR) was
    filed into the study of its source image; exporters send it by ``category``."""

    type: ClassVar[str] = "result.stored"

    sop_instance_uid: str
    sop_class_uid: str
    category: str  # ResultCategory


# --- in-process handlers ---------------------------------------------------------------------

E = TypeVar("E", bound=Event)
Handler = Callable[[Event], None]


class EventHandlers:
    """The in-process handlers, called after the transaction that recorded events commits.

    In the style of pynetdicom's ``evt_handlers``: ``(event class, handler)`` pairs, given at
    construction or added with ``register`` (or the ``on`` decorator); the class ``Event``
    itself means every event. Handlers run in the committing thread and must be quick (wake
    something up); an exception is logged and never reaches the writer, whose change is
    already committed. Durable work belongs to outbox consumers, not here.
    """

    def __init__(self, handlers: Iterable[tuple[type[Event], Handler]] = ()) -> None:
        self._handlers: list[tuple[type[Event], Handler]] = []
        self._lock = threading.Lock()
        for event_class, handler in handlers:
            self.register(event_class, handler)

    def register(self, event_class: type[Event], handler: Handler) -> Callable[[], None]:
        """Call ``handler`` for each committed event of ``event_class`` (or a subclass); returns the unregister function."""
        entry = (event_class, handler)
        with self._lock:
            self._handlers.append(entry)

        def unregister() -> None:
            with self._lock:
                if entry in self._handlers:
                    self._handlers.remove(entry)

        return unregister

    def on(self, event_class: type[E]) -> Callable[[Callable[[E], None]], Callable[[E], None]]:
        """Decorator form of ``register``."""

        def decorate(handler: Callable[[E], None]) -> Callable[[E], None]:
            self.register(event_class, handler)  # type: ignore[arg-type]
            return handler

        return decorate

    def dispatch(self, events: Iterable[Event]) -> None:
        """Call the handlers of each event, in order; a failing handler is logged and skipped."""
        with self._lock:
            handlers = list(self._handlers)
        if not handlers:
            return
        for event in events:
            for event_class, handler in handlers:
                if isinstance(event, event_class):
                    try:
                        handler(event)
                    except Exception:
                        log.exception(
                            "event handler failed", extra={"event": event.type, "study_uid": event.study_uid}
                        )


# --- relaying to another process -------------------------------------------------------------

# A write of at most PIPE_BUF bytes to a pipe is atomic (POSIX; 4096 on Linux): lines written by
# several threads and processes to one pipe never interleave. Events name UIDs and ids only, so a
# line is a few hundred bytes; a longer one is not relayed (logged).
RELAY_LINE_MAX = 4096


def relay_line(event: Event) -> bytes:
    """``event`` as one line of UTF-8 JSON, ``{"type": ..., "payload": ...}`` and a newline."""
    text = json.dumps(
        {"type": event.type, "payload": event.payload()}, ensure_ascii=False, separators=(",", ":")
    )
    return text.encode("utf-8") + b"\n"


def relayed(line: bytes) -> Event:
    """The event of a :func:`relay_line` line; ``UnknownEvent`` for a line this version cannot read."""
    try:
        obj = json.loads(line)
        return decode(obj["type"], obj["payload"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UnknownEvent(f"not a relayed event: {exc}") from None


class EventRelay:
    """An in-process handler that writes each committed event to a pipe another process reads.

    Register it for ``Event`` (every event). The pipe is made non-blocking: a commit never
    waits for the reader. When the pipe is full the event is dropped and counted (``dropped``):
    the reader still has the pipe's earlier lines to wake it, so nothing that reads the
    database (triage queue, outbox consumers) misses work, only an in-memory counter of the
    reader (metrics) misses that event. When the reader has gone (its process died) nothing is
    written: ``reader_gone`` says so.
    """

    def __init__(self, fd: int) -> None:
        """``fd``: the write end of a pipe (owned by the caller, who closes it)."""
        os.set_blocking(fd, False)
        self.fd = fd
        self.dropped = 0
        self.reader_gone = False

    def __call__(self, event: Event) -> None:
        line = relay_line(event)
        if len(line) > RELAY_LINE_MAX:
            log.warning("event too long to relay", extra={"event": event.type, "bytes": len(line)})
            return
        try:
            os.write(self.fd, line)
        except BlockingIOError:
            self.dropped += 1
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.EBADF):
                raise
            self.reader_gone = True
