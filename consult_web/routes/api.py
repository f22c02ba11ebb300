"""The JSON API (session cookie or ``Authorization: Bearer <token>``) and ``/healthz``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from consult_web.access import visibility_clause, visible_study
from consult_web.audit import audit
from consult_web.auth import current_user
from xray_triage import __version__
from xray_triage.consults import rules as flow
from xray_triage.store.queries import count_studies, get_study, list_studies
from xray_triage.store.users import AuthUser

router = APIRouter()


@router.get("/healthz")
def healthz(request: Request) -> JSONResponse:
    """Unauthenticated on purpose: this is what monitoring and the Docker health check read.

    ``storage`` is ``degraded`` (and the status 503) when the data directory's disk has
    less than ``min_free_disk_mb`` free or start-up storage work has not succeeded yet;
    ``disk_free_mb`` says how much is free.
    """
    state = request.app.state.health
    card = request.app.state.card
    try:
        with request.app.state.db.session() as session:
            session.execute(text("SELECT 1"))
        database = "ok"
    except Exception as exc:  # report, don't crash
        database = f"error: {type(exc).__name__}"
    storage = request.app.state.storage.report()
    ok = database == "ok" and storage["storage"] == "ok" and all(v == "ok" for v in state.values())
    body = {
        "status": "ok" if ok else "degraded",
        "version": __version__,
        "database": database,
        "model": card.model_version if card else None,
        **storage,
        **state,
    }
    # JSON either way (never the HTML error page): monitoring reads which part failed.
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/api/studies")
def api_studies(
    request: Request,
    limit: int | None = Query(None, ge=1, le=500),
    offset: int = Query(0, ge=0),
    user: AuthUser = Depends(current_user),
) -> dict[str, Any]:
    """One page of the studies the user may see, most urgent first, then newest (as ``studies list``).

    ``limit`` (default ``worklist_page_size``, at most 500) studies from ``offset``. The answer
    gives ``total`` (studies visible) and ``next_offset`` (null on the last page): fetch again
    with ``offset=next_offset`` until it is null. Studies arriving meanwhile shift later pages.
    """
    limit = limit or request.app.state.settings.worklist_page_size
    where = visibility_clause(user)
    with request.app.state.db.read_session() as session:
        studies = list_studies(session, limit=limit, offset=offset, where=where)
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


@router.get("/api/studies/{study_uid}")
def api_study(request: Request, study_uid: str, user: AuthUser = Depends(current_user)) -> dict[str, Any]:
    with request.app.state.db.session() as session:
        visible_study(session, user, study_uid)
        study = get_study(session, study_uid)
        audit(session, user, "study.view", study_uid=study_uid, request=request, via="api")
    assert study is not None
    study["disclaimer"] = request.app.state.disclaimer
    return study


@router.get("/api/studies/{study_uid}/consults")
def api_consults(request: Request, study_uid: str, user: AuthUser = Depends(current_user)) -> dict[str, Any]:
    with request.app.state.db.read_session() as session:
        study = visible_study(session, user, study_uid)
        consults = [
            {
                "id": c.id,
                "status": c.status,
                "urgency": c.urgency,
                "question": c.question,
                "conclusion": c.conclusion,
                "requested_by": c.requested_by.username,
                "claimed_by": c.claimed_by.username if c.claimed_by else None,
                "created_at": c.created_at.isoformat(),
                "updated_at": c.updated_at.isoformat(),
                "messages": [
                    {"author": m.author.username, "body": m.body, "created_at": m.created_at.isoformat()}
                    for m in c.messages
                ],
            }
            for c in flow.consults_of(session, study)
        ]
    return {"consults": consults}
