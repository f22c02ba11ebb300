"""The HTTP side: health check and the JSON read API.

The teleconsult pages (worklist, viewer, annotations, consults) and
authentication are built on this app by the web issue.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, HTTPException, Query
from sqlalchemy import text

from xray_triage import __version__
from xray_triage.inference.card import ModelCard
from xray_triage.store.db import Database
from xray_triage.store.queries import get_study, list_studies

DISCLAIMER = (
    "AI output is decision support, not a diagnosis. The default model is a demonstration "
    "trained on a small public data set and is not a clinical device."
)


def create_app(db: Database, card: ModelCard | None = None, health: dict[str, Any] | None = None) -> FastAPI:
    """Build the app around an open database; ``health`` holds live component state."""
    app = FastAPI(title="xray-triage", version=__version__)
    state = health if health is not None else {}

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        try:
            with db.session() as session:
                session.execute(text("SELECT 1"))
            database = "ok"
        except Exception as exc:  # report, don't crash: this is what monitoring reads
            database = f"error: {exc}"
        ok = database == "ok" and all(v == "ok" for v in state.values())
        body = {
            "status": "ok" if ok else "degraded",
            "version": __version__,
            "database": database,
            "model": card.model_version if card else None,
            **state,
        }
        if not ok:
            raise HTTPException(status_code=503, detail=body)
        return body

    @app.get("/api/studies")
    def api_studies(limit: int = Query(200, ge=1, le=1000), offset: int = Query(0, ge=0)) -> dict[str, Any]:
        with db.session() as session:
            return {"studies": list_studies(session, limit=limit, offset=offset), "disclaimer": DISCLAIMER}

    @app.get("/api/studies/{study_uid}")
    def api_study(study_uid: str) -> dict[str, Any]:
        with db.session() as session:
            study = get_study(session, study_uid)
        if study is None:
            raise HTTPException(status_code=404, detail=f"no study with Study Instance UID {study_uid}")
        study["disclaimer"] = DISCLAIMER
        return study

    return app
