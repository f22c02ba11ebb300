"""Live updates over server-sent events (``GET /events``), one database poll for all streams.

The changes are the domain events of the durable outbox (``xray_triage/store/outbox.py``),
read from the database rather than taken from in-process callbacks, so every writer is
seen (the DICOM gateway and triage workers, this web app, another process on the same
database): an image stored or triaged (or failed) is a "study" change, consult and
annotation events keep the names browsers know ("consult.request", "annotation.update"...).
Each change names only the study UID; browsers re-fetch what they show, through the same
permission checks as any page. A station user is told only of its own station's studies
(each event carries its study's ``station_ae``).

One ``LivePoller`` per app reads the events after its position every ``live_poll_s``
seconds, while at least one stream is open, and hands each stream the changes its user may
see: the database cost is one poll per interval whatever the number of streams (one poll per
stream let 300 streams of one user push another user's worklist p95 from 20 ms to 1.6 s).
An event committed in this process (``Database.events``) wakes the poller early, at most
once per ``min_gap_s`` (a quarter interval). The poller keeps its position in memory, not in
``outbox_cursors``: a stream only wants changes from the moment it opened. ``StreamLimits``
caps the streams a browser login and a user may hold open
(``live_max_streams_per_session``, ``live_max_streams_per_user``): one more is refused
with HTTP 429 and a translated message rather than closing an older stream, because a
refused ``EventSource`` stays closed (its page shows "offline") while a closed one
reconnects after its retry delay and would close the next, forever. The limits count the
streams of *this* process on purpose, with several web processes too: an open stream costs
the process that holds it (a connection, a task, a queue), so each process guards its own
resources, and a browser's streams to N processes are bounded by N times the limit, which a
load balancer with sticky sessions keeps at one process per browser.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from consult_web.auth import SESSION_COOKIE
from consult_web.deps import CurrentUser
from consult_web.errors import LocalizedError
from consult_web.permissions import can_see_station
from xray_triage.events import (
    AnnotationChanged,
    ConsultAnswered,
    ConsultClaimed,
    ConsultClosed,
    ConsultRequested,
    Event,
    InstanceStored,
    ReplyPosted,
    TriageCompleted,
    TriageFailed,
)
from xray_triage.store import outbox
from xray_triage.store.consult_schema import CONSULT_ANSWERED
from xray_triage.store.db import Database
from xray_triage.store.users import AuthUser

log = logging.getLogger(__name__)
router = APIRouter()
HEARTBEAT_S = 15.0
QUEUE_SIZE = 256  # changes waiting for one slow stream; past that they are dropped (pages re-fetch anyway)
POLL_BATCH = 1000  # outbox events read per poll at most; a larger burst takes several polls


@dataclass(frozen=True)
class Change:
    """One change: ``kind`` is "study" (arrived, triaged) or a consult/annotation action; ``station_ae`` decides who sees it."""

    kind: str
    study_uid: str
    station_ae: str
    answer: bool = False  # a specialist answered (a reply that made the consult "answered", or a conclusion)

    def event(self) -> dict[str, str | bool]:
        """What the browser gets; ``answer`` only when true (``static/notify.js`` tells the station doctor)."""
        data: dict[str, str | bool] = {"kind": self.kind, "study_uid": self.study_uid}
        if self.answer:
            data["answer"] = True
        return data


# What the browser is told of each event (``static/app.js``, ``study.js`` and ``viewer.js`` read
# these kinds). Events not listed (a quarantined image, in no study) are not pushed.
STUDY_CHANGE = "study"
LIVE_KINDS: dict[type[Event], str] = {
    InstanceStored: STUDY_CHANGE,
    TriageCompleted: STUDY_CHANGE,
    TriageFailed: STUDY_CHANGE,
    ConsultRequested: "consult.request",
    ConsultClaimed: "consult.claim",
    ReplyPosted: "consult.reply",
    ConsultAnswered: "consult.conclude",
    ConsultClosed: "consult.close",
}


def live_change(event: Event) -> Change | None:
    """The change browsers are told of for ``event``, or None when they are not told."""
    if isinstance(event, AnnotationChanged):
        kind: str | None = f"annotation.{event.change}"
    else:
        kind = LIVE_KINDS.get(type(event))
    if not kind:
        return None
    answer = isinstance(event, ConsultAnswered) or (isinstance(event, ReplyPosted) and event.status == CONSULT_ANSWERED)
    return Change(kind, event.study_uid, event.station_ae, answer)


class ChangeFeed:
    """Where the poller has read the outbox up to (an event id); starts at the newest event."""

    def __init__(self, db: Database, batch: int = POLL_BATCH) -> None:
        self.db = db
        self.batch = batch
        with db.read_session() as session:
            self.event_id = outbox.latest_id(session)

    def poll(self) -> list[Change]:
        """Every change since the last poll, for all users (``visible_changes`` filters per user).

        A burst of more than ``batch`` events is read over several polls. Repeats within one
        poll (three images of one study) are sent once: browsers re-fetch the whole study anyway.
        """
        with self.db.read_session() as session:
            stored, self.event_id = outbox.read_after(session, self.event_id, self.batch)
        changes = (live_change(s.event) for s in stored)
        return list(dict.fromkeys(c for c in changes if c is not None))


def visible_changes(user: AuthUser, changes: list[Change]) -> list[Change]:
    return [c for c in changes if can_see_station(user, c.station_ae)]


@dataclass(eq=False)
class Subscriber:
    """One open stream: its user and the changes waiting to be sent."""

    user: AuthUser
    queue: asyncio.Queue[Change] = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))

    def offer(self, changes: list[Change]) -> None:
        for change in visible_changes(self.user, changes):
            if self.queue.full():
                return  # a stalled browser: drop, its page re-fetches on the next change it gets
            self.queue.put_nowait(change)


class LivePoller:
    """Polls the database once per ``interval_s`` while any stream is subscribed, and fans out.

    ``on_poll`` (tests, monitoring) is called with the changes after each database poll.
    The polling task lives on the event loop of the first subscriber (uvicorn's one loop)
    and ends when the last stream closes; the next subscriber starts it again from "now".
    """

    def __init__(
        self,
        db: Database,
        interval_s: float,
        on_poll: Callable[[list[Change]], None] | None = None,
        min_gap_s: float | None = None,
    ) -> None:
        """``min_gap_s``: the shortest time between two polls when events wake the poller (``interval_s / 4``)."""
        self.db = db
        self.interval_s = interval_s
        self.min_gap_s = min(interval_s, min_gap_s if min_gap_s is not None else interval_s / 4)
        self.feed: ChangeFeed | None = None  # set once the running poller knows where the outbox ends
        self.on_poll = on_poll
        self.polls = 0
        self.subscribers: set[Subscriber] = set()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        db.events.register(Event, self._on_commit)

    def _on_commit(self, event: Event) -> None:
        """In the committing thread, after the commit: a change browsers are told of wakes the poller."""
        loop, wake = self._loop, self._wake
        if loop is None or wake is None or live_change(event) is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop has closed (the app stopped)
            loop.call_soon_threadsafe(wake.set)

    def subscribe(self, user: AuthUser) -> Subscriber:
        subscriber = Subscriber(user)
        self.subscribers.add(subscriber)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="live-poller")
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self.subscribers.discard(subscriber)

    async def _wait(self, wake: asyncio.Event) -> None:
        """Until the next poll: ``interval_s``, or ``min_gap_s`` when an event was committed in this process."""
        await asyncio.sleep(self.min_gap_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), self.interval_s - self.min_gap_s)
        wake.clear()

    async def _run(self) -> None:
        wake = asyncio.Event()
        self._loop, self._wake, self.feed = asyncio.get_running_loop(), wake, None
        feed = self.feed = await run_in_threadpool(ChangeFeed, self.db)
        while self.subscribers:
            await self._wait(wake)
            if not self.subscribers:
                break
            try:
                changes = await run_in_threadpool(feed.poll)
            except Exception:  # a locked or restarting database: log, keep the streams, try again
                log.exception("live-update poll failed")
                continue
            self.polls += 1
            if self.on_poll is not None:
                self.on_poll(changes)
            for subscriber in list(self.subscribers):
                subscriber.offer(changes)


class StreamLimits:
    """Open streams per browser login and per user; ``acquire`` says which limit refused (or None)."""

    def __init__(self, per_session: int, per_user: int) -> None:
        self.per_session = per_session
        self.per_user = per_user
        self._sessions: dict[str, int] = {}
        self._users: dict[int, int] = {}
        self._lock = threading.Lock()

    def acquire(self, user_id: int, session_key: str) -> str | None:
        with self._lock:
            if self._sessions.get(session_key, 0) >= self.per_session:
                return "session"
            if self._users.get(user_id, 0) >= self.per_user:
                return "user"
            self._sessions[session_key] = self._sessions.get(session_key, 0) + 1
            self._users[user_id] = self._users.get(user_id, 0) + 1
            return None

    def release(self, user_id: int, session_key: str) -> None:
        with self._lock:
            _decrement(self._sessions, session_key)
            _decrement(self._users, user_id)

    def open_streams(self, user_id: int) -> int:
        with self._lock:
            return self._users.get(user_id, 0)


def _decrement(counts: dict[Any, int], key: Any) -> None:
    """One stream fewer; a key at zero is dropped, so the tables only hold open streams."""
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


@dataclass
class LiveHub:
    """The app's live-update state (``app.state.live``)."""

    poller: LivePoller
    limits: StreamLimits


def make_hub(db: Database, settings: Any) -> LiveHub:
    return LiveHub(
        LivePoller(db, settings.live_poll_s),
        StreamLimits(settings.live_max_streams_per_session, settings.live_max_streams_per_user),
    )


class _ReleasingStream(StreamingResponse):
    """Runs ``on_close`` however the response ends (sent, disconnected, cancelled, never iterated)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _stream(request: Request, subscriber: Subscriber, interval: float) -> AsyncIterator[str]:
    yield "retry: 3000\n\n"
    quiet = 0.0
    stopping = getattr(request.app.state, "stopping", lambda: False)
    while not stopping() and not await request.is_disconnected():
        try:
            change = await asyncio.wait_for(subscriber.queue.get(), timeout=interval)
        except TimeoutError:
            quiet += interval
            if quiet >= HEARTBEAT_S:
                quiet = 0.0
                yield ": keep-alive\n\n"
            continue
        quiet = 0.0
        yield f"event: change\ndata: {json.dumps(change.event())}\n\n"


@router.get("/events")
async def events(request: Request, user: CurrentUser) -> StreamingResponse:
    hub: LiveHub = request.app.state.live
    session_key = hashlib.sha256(request.cookies.get(SESSION_COOKIE, "").encode()).hexdigest()
    refused = hub.limits.acquire(user.id, session_key)
    if refused is not None:
        limit = hub.limits.per_session if refused == "session" else hub.limits.per_user
        log.warning("live-update stream refused", extra={"user": user.username, "limit": refused, "max": limit})
        raise LocalizedError(429, f"live.too_many_streams_{refused}", limit=limit)
    subscriber = hub.poller.subscribe(user)

    def close() -> None:
        hub.poller.unsubscribe(subscriber)
        hub.limits.release(user.id, session_key)

    return _ReleasingStream(
        _stream(request, subscriber, hub.poller.interval_s),
        close,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
