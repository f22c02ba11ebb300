"""``GET /healthz``: what monitoring and the Docker health check read (no login, not in the API schema)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from consult_web.deps import Card, Db, Storage
from xray_triage import __version__

router = APIRouter()


@router.get("/healthz")
def healthz(request: Request, db: Db, storage: Storage, card: Card) -> JSONResponse:
    """Unauthenticated on purpose: this is what monitoring and the Docker health check read.

    ``storage`` is ``degraded`` (and the status 503) when the data directory's disk has
    less than ``min_free_disk_mb`` free or start-up storage work has not succeeded yet;
    ``disk_free_mb`` says how much is free.
    """
    state = request.app.state.health
    try:
        with db.session() as session:
            session.execute(text("SELECT 1"))
        database = "ok"
    except Exception as exc:  # report, don't crash
        database = f"error: {type(exc).__name__}"
    report = storage.report()
    ok = database == "ok" and report["storage"] == "ok" and all(v == "ok" for v in state.values())
    body = {
        "status": "ok" if ok else "degraded",
        "version": __version__,
        "database": database,
        "model": card.model_version if card else None,
        **report,
        **state,
    }
    # JSON either way (never the HTML error page): monitoring reads which part failed.
    return JSONResponse(body, status_code=200 if ok else 503)
