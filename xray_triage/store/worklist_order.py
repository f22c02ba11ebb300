"""The one worklist order, and why each study sits where it does.

A human asking for help outranks the model: an open consult (requested or in review)
marked emergency comes first, whatever the AI said; then open urgent requests; then
AI-urgent studies; then the rest by AI priority (abnormal, normal, no result yet).
Within a tier, open consults come before answered ones, answered before none, closed
last; then the longest-waiting study first. The web worklist, ``/api/studies`` and
``xray-triage studies list`` all sort with ``order_by`` and label rows with ``why``;
``TIERS`` names the tiers in order (the README's "Worklist order" lists them).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, case, select

from xray_triage.priority import PRIORITY_RANK, PRIORITY_URGENT
from xray_triage.store.consult_schema import (
    CONSULT_IN_REVIEW,
    CONSULT_REQUESTED,
    CONSULT_STATUS_RANK,
    CONSULT_STATUSES,
    Consult,
)
from xray_triage.store.schema import Study

OPEN_STATUSES = (CONSULT_REQUESTED, CONSULT_IN_REVIEW)
URGENCY_EMERGENCY = "emergency"
URGENCY_URGENT = "urgent"
# Tier names, first to last; ``why`` returns one of them for each study.
TIERS = ("emergency_consult", "urgent_consult", "ai_urgent", "ai_abnormal", "ai_normal", "ai_none")


def latest_consult(column):  # type: ignore[no-untyped-def]
    """A column of the study's newest consult, as a correlated subquery (NULL: no consult)."""
    return (
        select(column)
        .where(Consult.study_id == Study.id)
        .order_by(Consult.id.desc())
        .limit(1)
        .scalar_subquery()
    )


def why(priority: str | None, consult_status: str | None, consult_urgency: str | None) -> str:
    """The study's tier (one of ``TIERS``): the same rule as ``tier_clause``, in Python."""
    if consult_status in OPEN_STATUSES and consult_urgency == URGENCY_EMERGENCY:
        return "emergency_consult"
    if consult_status in OPEN_STATUSES and consult_urgency == URGENCY_URGENT:
        return "urgent_consult"
    rank = PRIORITY_RANK.get(priority, 0)
    return {3: "ai_urgent", 2: "ai_abnormal", 1: "ai_normal"}.get(rank, "ai_none")


def tier_clause(status, urgency):  # type: ignore[no-untyped-def]
    """SQL: the study's position in ``TIERS`` (0 first) from its newest consult's status and urgency."""
    is_open = status.in_(OPEN_STATUSES)
    return case(
        (and_(is_open, urgency == URGENCY_EMERGENCY), 0),
        (and_(is_open, urgency == URGENCY_URGENT), 1),
        (Study.priority_rank == PRIORITY_RANK[PRIORITY_URGENT], 2),
        (Study.priority_rank == 2, 3),
        (Study.priority_rank == 1, 4),
        else_=5,
    )


def consult_columns() -> tuple[Any, Any]:
    """(status, urgency) of each study's newest consult, as correlated subqueries."""
    return latest_consult(Consult.status), latest_consult(Consult.urgency)


def order_by(status, urgency) -> list[Any]:  # type: ignore[no-untyped-def]
    """ORDER BY terms of the worklist order (see the module docstring)."""
    rank = case(
        *[(status == name, CONSULT_STATUS_RANK[name]) for name in CONSULT_STATUSES],
        else_=CONSULT_STATUS_RANK[None],
    )
    return [tier_clause(status, urgency), rank, Study.received_at.asc(), Study.id.asc()]
