"""The studies JSON API (session cookie or ``Authorization: Bearer <token>``) and its schema.

Every route here is on ``api_router`` (prefix ``/api``), answers with a model of
``consult_web.schemas`` and is described by ``GET /api/openapi.json`` (logged-in users
only, like the rest of the API), from which API clients can be generated.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.openapi.utils import get_openapi

from consult_web import schemas
from consult_web.access import visible_study
from consult_web.audit import audit
from consult_web.deps import AppSettings, Card, CurrentUser, ReadSession, WriteSession, urgent_labels
from consult_web.permissions import visibility_clause
from xray_triage import __version__
from xray_triage.consults import rules as flow
from xray_triage.store.queries import count_studies, get_study, list_studies

api_router = APIRouter(prefix="/api", tags=["studies"])
OPENAPI_DESCRIPTION = (
    "The xray-triage JSON API. Authenticate with `Authorization: Bearer <token>` (tokens are made "
    "with `xray-triage users token`) or a browser session. AI output is decision support, not a diagnosis."
)


@api_router.get("/studies", response_model=schemas.StudyPage)
def api_studies(
    request: Request,
    user: CurrentUser,
    settings: AppSettings,
    session: ReadSession,
    card: Card,
    limit: int | None = Query(None, ge=1, le=500),
    offset: int = Query(0, ge=0),
) -> dict[str, Any]:
    """One page of the studies the user may see, in the worklist order (as ``studies list``).

    Each study's ``why`` names its tier (README "Worklist order"); ``findings`` are the
    flagged ones, each with the threshold it crossed and whether it is an urgent label.

    ``limit`` (default ``worklist_page_size``, at most 500) studies from ``offset``. The answer
    gives ``total`` (studies visible) and ``next_offset`` (null on the last page): fetch again
    with ``offset=next_offset`` until it is null. Studies arriving meanwhile shift later pages.
    """
    limit = limit or settings.worklist_page_size
    where = visibility_clause(user)
    studies = list_studies(session, limit=limit, offset=offset, where=where, urgent_labels=urgent_labels(card))
    total = count_studies(session, where)
    next_offset = offset + len(studies) if offset + len(studies) < total else None
    return {
        "studies": studies,
        "total": total,
        "limit": limit,
        "offset": offset,
        "next_offset": next_offset,
        "disclaimer": request.app.state.disclaimer,
    }


@api_router.get("/studies/{study_uid}", response_model=schemas.StudyDetail)
def api_study(
    request: Request, study_uid: str, user: CurrentUser, session: WriteSession, card: Card
) -> dict[str, Any]:
    """The study with every image and its AI result (the view is audited)."""
    visible_study(session, user, study_uid)
    study = get_study(session, study_uid, urgent_labels(card))
    audit(session, user, "study.view", study_uid=study_uid, request=request, via="api")
    assert study is not None
    study["disclaimer"] = request.app.state.disclaimer
    return study


@api_router.get("/studies/{study_uid}/consults", response_model=schemas.ConsultList)
def api_consults(study_uid: str, user: CurrentUser, session: ReadSession) -> schemas.ConsultList:
    """The study's consults, oldest first, with their messages."""
    study = visible_study(session, user, study_uid)
    return schemas.ConsultList(consults=[schemas.Consult.from_row(c) for c in flow.consults_of(session, study)])


@api_router.get("/openapi.json", include_in_schema=False)
def openapi_schema(request: Request, _user: CurrentUser) -> dict[str, Any]:
    """The OpenAPI 3 document of the JSON API routes (``app.state.api_routes``), built once."""
    state = request.app.state
    if getattr(state, "api_schema", None) is None:
        schema = get_openapi(
            title="xray-triage API",
            version=__version__,
            description=OPENAPI_DESCRIPTION,
            routes=state.api_routes,
        )
        schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        schema["security"] = [{"bearer": []}]
        state.api_schema = schema
    return state.api_schema
