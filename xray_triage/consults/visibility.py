"""Which studies a user may see: a station user its own station's, everyone else all.

The web app's ``consult_web/access.py`` builds its 404-on-invisible lookups on these;
annotation and consult rules use them too.
"""

from __future__ import annotations

from sqlalchemy import ColumnElement, true

from xray_triage.store.consult_schema import ROLE_STATION
from xray_triage.store.schema import Study
from xray_triage.store.users import AuthUser


def visibility_clause(user: AuthUser) -> ColumnElement[bool]:
    """A WHERE clause on ``Study`` that keeps what ``user`` may see."""
    if user.role == ROLE_STATION:
        return Study.station_ae == (user.station_ae or "\x00no-station")
    return true()


def can_see_station(user: AuthUser, station_ae: str) -> bool:
    """Whether ``user`` may see the studies a station (by AE title) sent."""
    return user.role != ROLE_STATION or (bool(user.station_ae) and station_ae == user.station_ae)


def can_see(user: AuthUser, study: Study) -> bool:
    return can_see_station(user, study.station_ae)
