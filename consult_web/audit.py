"""The audit log: who viewed or changed which study, and when.

Web-originated changes are also read back from this table by the live-update
stream (``live.py``), so every state change must be audited in the same
transaction that makes it.
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

# Actions that only read: not pushed to other browsers as changes.
VIEW_ACTIONS = ("study.view",)


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
