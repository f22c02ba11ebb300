"""The audit log: who viewed or changed which study, and when (and logins, admin actions).

Only an audit log: nothing else reads it. What other parts react to (live updates,
later exporters) are the domain events of the outbox (``xray_triage/events.py``).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request
from sqlalchemy.orm import Session

from consult_web.auth import client_ip
from xray_triage.store.consult_schema import AuditEvent
from xray_triage.store.users import AuthUser

log = logging.getLogger("consult_web.audit")


def audit(
    session: Session,
    user: AuthUser | None,
    action: str,
    *,
    study_uid: str | None = None,
    request: Request | None = None,
    username: str | None = None,
    **detail: Any,
) -> None:
    ip = client_ip(request) if request is not None else ""
    session.add(
        AuditEvent(
            user_id=user.id if user else None,
            username=(user.username if user else username or "")[:64],
            action=action,
            study_uid=study_uid,
            detail=detail,
            ip=ip,
        )
    )
    log.info(action, extra={"user": user.username if user else username, "study_uid": study_uid, "ip": ip})
