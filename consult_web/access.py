"""Which studies a user may see: a station user its own station's, everyone else all.

The rule itself is core's (``xray_triage/consults/visibility.py``, reached through
``consult_web.permissions``); this module adds the web's lookups. Every route that touches a study goes through ``visible_study`` (or
filters with ``visibility_clause``). A study the user may not see answers 404, the same
as a study that does not exist, so guessing UIDs tells a station nothing.
"""

from __future__ import annotations

from fastapi import HTTPException
from sqlalchemy.orm import Session

from consult_web.permissions import can_see
from xray_triage.store.schema import Instance, Series, Study
from xray_triage.store.users import AuthUser


def visible_study(session: Session, user: AuthUser, study_uid: str) -> Study:
    study = session.query(Study).filter(Study.study_instance_uid == study_uid).one_or_none()
    if study is None or not can_see(user, study):
        raise HTTPException(status_code=404, detail="study not found")
    return study


def visible_instance(session: Session, user: AuthUser, study_uid: str, sop_uid: str) -> tuple[Study, Instance]:
    study = visible_study(session, user, study_uid)
    instance = (
        session.query(Instance)
        .join(Series, Instance.series_id == Series.id)
        .filter(Series.study_id == study.id, Instance.sop_instance_uid == sop_uid)
        .one_or_none()
    )
    if instance is None:
        raise HTTPException(status_code=404, detail="image not found")
    return study, instance
