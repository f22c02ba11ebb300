"""Worklist pages: the full page and the table body that live updates re-fetch."""

from __future__ import annotations

from datetime import date
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse

from consult_web.deps import AppSettings, Card, CurrentUser, ReadSession, urgent_labels
from consult_web.errors import LocalizedError
from consult_web.permissions import sees_all_stations
from consult_web.templating import render
from consult_web.worklist import NO_CONSULT, WorklistFilters, WorklistPage, known_findings, query_worklist
from xray_triage.store.consult_schema import CONSULT_STATUSES
from xray_triage.store.delivery_backlog import waiting_images
from xray_triage.store.schema import AI_DONE, AI_FAILED, AI_NOT_APPLICABLE, AI_PENDING
from xray_triage.store.stations import list_stations

router = APIRouter()
AI_STATUSES = (AI_PENDING, AI_DONE, AI_FAILED, AI_NOT_APPLICABLE)


def _date(value: str, name: str) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError as exc:
        raise LocalizedError(400, "usererror.bad_date", name=name, value=repr(value[:20])) from exc


def parse_filters(
    station: str = Query("", max_length=16),
    status: str = Query("", max_length=16),
    ai: str = Query("", max_length=16),
    date_from: str = Query("", max_length=10),
    date_to: str = Query("", max_length=10),
    finding: str = Query("", max_length=64),
) -> WorklistFilters:
    return WorklistFilters(
        station=station.strip(),
        status=status if status in (*CONSULT_STATUSES, NO_CONSULT) else "",
        ai=ai if ai in AI_STATUSES else "",
        date_from=_date(date_from, "date_from"),
        date_to=_date(date_to, "date_to"),
        finding=finding.strip(),
    )


Filters = Annotated[WorklistFilters, Depends(parse_filters)]


def page_url(filters: WorklistFilters, page: int, path: str = "/worklist") -> str:
    """A link to another page of the same list: the user's filters are kept."""
    return f"{path}?{urlencode({**filters.as_query(), 'page': page})}"


def _pager(filters: WorklistFilters, result: WorklistPage) -> dict[str, object]:
    return {
        "page": result,
        "prev_url": page_url(filters, result.page - 1) if result.page > 1 else "",
        "next_url": page_url(filters, result.page + 1) if result.page < result.pages else "",
        "rows_src": page_url(filters, result.page, "/worklist/rows"),
    }


@router.get("/worklist")
def worklist_page(
    request: Request,
    user: CurrentUser,  # first: a bad filter is then told in the user's language
    filters: Filters,
    settings: AppSettings,
    session: ReadSession,
    card: Card,
    page: int = Query(1, ge=1, le=1_000_000),
) -> HTMLResponse:
    result = query_worklist(
        session, user, filters, page=page, page_size=settings.worklist_page_size, urgent_labels=urgent_labels(card)
    )
    stations = list_stations(session) if sees_all_stations(user) else []
    findings = known_findings(session)
    station_options = [(s.ae_title, s.name) for s in stations]
    return render(
        request,
        "worklist.html",
        {
            "rows": result.rows,
            **_pager(filters, result),
            "filters": filters,
            "stations": station_options,
            "findings": findings,
            "consult_statuses": (*CONSULT_STATUSES, NO_CONSULT),
            "ai_statuses": AI_STATUSES,
            "waiting": waiting_images(session),  # an edge station's images not yet at the centre
        },
    )


@router.get("/worklist/rows")
def worklist_rows(
    request: Request,
    user: CurrentUser,  # first: a bad filter is then told in the user's language
    filters: Filters,
    settings: AppSettings,
    session: ReadSession,
    card: Card,
    page: int = Query(1, ge=1, le=1_000_000),
) -> HTMLResponse:
    result = query_worklist(
        session, user, filters, page=page, page_size=settings.worklist_page_size, urgent_labels=urgent_labels(card)
    )
    return render(request, "_worklist_rows.html", {"rows": result.rows})
