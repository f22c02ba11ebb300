"""Live updates over server-sent events (``GET /events``), one database poll for all streams.

The changes come from the database rather than in-process callbacks, so every writer
is seen (the DICOM gateway and triage workers, this web app, another process on the
same database): studies whose ``updated_at`` moved (arrival, triage) and audit events
of web changes (consults, replies, annotations). Each event names only the study UID;
browsers re-fetch what they show, through the same permission checks as any page. A
station user is told only of its own station's studies.

One ``LivePoller`` per app reads the changes every ``live_poll_s`` seconds, while at
least one stream is open, and hands each stream the changes its user may see: the
database cost is one poll per interval whatever the number of streams (one poll per
stream let 300 streams of one user push another user's worklist p95 from 20 ms to
1.6 s). ``StreamLimits`` caps the streams a browser login and a user may hold open
(``live_max_streams_per_session``, ``live_max_streams_per_user``): one more is refused
with HTTP 429 and a translated message rather than closing an older stream, because a
refused ``EventSource`` stays closed (its page shows "offline") while a closed one
reconnects after its retry delay and would close the next, forever.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import func, select
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from consult_web.audit import VIEW_ACTIONS
from consult_web.auth import SESSION_COOKIE
from consult_web.deps import CurrentUser
from consult_web.errors import LocalizedError
from consult_web.permissions import can_see_station
from xray_triage.store.consult_schema import AuditEvent
from xray_triage.store.db import Database
from xray_triage.store.schema import Study
from xray_triage.store.users import AuthUser

log = logging.getLogger(__name__)
router = APIRouter()
HEARTBEAT_S = 15.0
QUEUE_SIZE = 256  # changes waiting for one slow stream; past that they are dropped (pages re-fetch anyway)


@dataclass(frozen=True)
class Change:
    """One change: ``kind`` is "study" (arrived, triaged) or an audit action; ``station_ae`` decides who sees it."""

    kind: str
    study_uid: str
    station_ae: str

    def event(self) -> dict[str, str]:
        return {"kind": self.kind, "study_uid": self.study_uid}


class ChangeFeed:
    """Where the poller has read up to: the newest study change time and audit event id seen."""

    def __init__(self, db: Database) -> None:
        self.db = db
        with db.read_session() as session:
            self.study_time: datetime | None = session.scalar(select(func.max(Study.updated_at)))
            self.audit_id: int = session.scalar(select(func.max(AuditEvent.id))) or 0

    def poll(self) -> list[Change]:
        """Every change since the last poll, for all users (``visible_changes`` filters per user)."""
        changes: list[Change] = []
        with self.db.read_session() as session:
            # The upper bound is read first: an event committed during this poll is left for the next.
            newest = session.scalar(select(func.max(AuditEvent.id))) or self.audit_id
            query = select(Study.study_instance_uid, Study.station_ae, Study.updated_at)
            if self.study_time is not None:
                query = query.where(Study.updated_at > self.study_time)
            for uid, station_ae, updated in session.execute(query.order_by(Study.updated_at)):
                changes.append(Change("study", uid, station_ae))
                self.study_time = updated
            audits = session.execute(
                select(AuditEvent.action, AuditEvent.study_uid, Study.station_ae)
                .join(Study, Study.study_instance_uid == AuditEvent.study_uid)
                .where(AuditEvent.id > self.audit_id, AuditEvent.id <= newest, AuditEvent.action.not_in(VIEW_ACTIONS))
                .order_by(AuditEvent.id)
            ).all()
        changes.extend(Change(action, uid, station_ae) for action, uid, station_ae in audits)
        self.audit_id = max(self.audit_id, newest)
        return changes


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

    def __init__(self, db: Database, interval_s: float, on_poll: Callable[[list[Change]], None] | None = None) -> None:
        self.db = db
        self.interval_s = interval_s
        self.on_poll = on_poll
        self.polls = 0
        self.subscribers: set[Subscriber] = set()
        self._task: asyncio.Task[None] | None = None

    def subscribe(self, user: AuthUser) -> Subscriber:
        subscriber = Subscriber(user)
        self.subscribers.add(subscriber)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="live-poller")
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self.subscribers.discard(subscriber)

    async def _run(self) -> None:
        feed = await run_in_threadpool(ChangeFeed, self.db)
        while self.subscribers:
            await asyncio.sleep(self.interval_s)
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
