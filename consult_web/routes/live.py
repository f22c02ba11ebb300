"""Live updates over server-sent events (``GET /events``).

The stream watches the database rather than in-process callbacks, so it sees
every writer (the DICOM gateway and triage workers, this web app, another
process on the same database): studies whose ``updated_at`` moved (arrival,
triage) and audit events of web changes (consults, replies, annotations). Each
event names only the study UID; browsers re-fetch what they show, through the
same permission checks as any page. A station user is told only of its own
station's studies.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import func, select
from starlette.concurrency import run_in_threadpool

from consult_web.access import visibility_clause
from consult_web.audit import VIEW_ACTIONS
from consult_web.auth import current_user
from xray_triage.store.consult_schema import AuditEvent
from xray_triage.store.schema import Study
from xray_triage.store.users import AuthUser

router = APIRouter()
HEARTBEAT_S = 15.0


class ChangeCursor:
    """Where a stream has read up to: the newest study change time and audit event id seen."""

    def __init__(self, db: Any, user: AuthUser) -> None:
        self.db = db
        self.user = user
        with db.read_session() as session:
            self.study_time: datetime | None = session.scalar(select(func.max(Study.updated_at)))
            self.audit_id: int = session.scalar(select(func.max(AuditEvent.id))) or 0

    def poll(self) -> list[dict[str, str]]:
        events: list[dict[str, str]] = []
        with self.db.read_session() as session:
            # The upper bound is read first: an event committed during this poll is left for the next.
            newest = session.scalar(select(func.max(AuditEvent.id))) or self.audit_id
            query = select(Study.study_instance_uid, Study.updated_at).where(visibility_clause(self.user))
            if self.study_time is not None:
                query = query.where(Study.updated_at > self.study_time)
            for uid, updated in session.execute(query.order_by(Study.updated_at)):
                events.append({"kind": "study", "study_uid": uid})
                self.study_time = updated
            audits = session.execute(
                select(AuditEvent.action, AuditEvent.study_uid)
                .join(Study, Study.study_instance_uid == AuditEvent.study_uid)
                .where(
                    AuditEvent.id > self.audit_id,
                    AuditEvent.id <= newest,
                    AuditEvent.action.not_in(VIEW_ACTIONS),
                    visibility_clause(self.user),
                )
                .order_by(AuditEvent.id)
            ).all()
        events.extend({"kind": action, "study_uid": uid} for action, uid in audits)
        self.audit_id = max(self.audit_id, newest)
        return events


async def _stream(request: Request, user: AuthUser) -> AsyncIterator[str]:
    cursor = await run_in_threadpool(ChangeCursor, request.app.state.db, user)
    interval = request.app.state.settings.live_poll_s
    yield "retry: 3000\n\n"
    quiet = 0.0
    stopping = getattr(request.app.state, "stopping", lambda: False)
    while not stopping() and not await request.is_disconnected():
        await asyncio.sleep(interval)
        events = await run_in_threadpool(cursor.poll)
        for event in events:
            yield f"event: change\ndata: {json.dumps(event)}\n\n"
        quiet = 0.0 if events else quiet + interval
        if quiet >= HEARTBEAT_S:
            quiet = 0.0
            yield ": keep-alive\n\n"


@router.get("/events")
def events(request: Request, user: AuthUser = Depends(current_user)) -> StreamingResponse:
    return StreamingResponse(
        _stream(request, user),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
