"""Who may do what, said once for the whole web app.

The rules that are domain rules live in core and are re-exported here, so a route (or a
template, through its context) asks this module and never compares roles itself:

- which studies a user may see: ``xray_triage/consults/visibility.py`` (a station user
  its own station's, everyone else all);
- who may request, claim and conclude consults: ``xray_triage/consults/rules.py``;
- who may mark images: ``xray_triage/consults/annotations.py``.

The web-only rules (the admin pages, the station filter) are defined here, with the
dependencies that enforce them on routes (``require_roles``; ``deps.AdminUser``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Depends, HTTPException

from consult_web.auth import current_user
from xray_triage.consults.annotations import can_annotate as can_annotate
from xray_triage.consults.rules import can_request as can_request
from xray_triage.consults.rules import is_specialist as is_specialist
from xray_triage.consults.visibility import can_see as can_see
from xray_triage.consults.visibility import can_see_station as can_see_station
from xray_triage.consults.visibility import visibility_clause as visibility_clause
from xray_triage.store.consult_schema import ROLE_ADMIN, ROLE_STATION
from xray_triage.store.users import AuthUser


def is_admin(user: AuthUser) -> bool:
    """Admins manage users, stations and quarantined images (``/admin``)."""
    return user.role == ROLE_ADMIN


def sees_all_stations(user: AuthUser) -> bool:
    """Whether the worklist offers the station filter: a station user only ever sees its own."""
    return user.role != ROLE_STATION


def require_roles(*roles: str) -> Callable[..., Awaitable[AuthUser]]:
    """Dependency factory: the logged-in user must have one of ``roles`` (else 403)."""

    async def dependency(user: AuthUser = Depends(current_user)) -> AuthUser:
        if user.role not in roles:
            raise HTTPException(status_code=403, detail="forbidden")
        return user

    return dependency


require_admin = require_roles(ROLE_ADMIN)
