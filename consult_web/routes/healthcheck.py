"""``GET /healthz``: what monitoring and the Docker health check read (no login, not in the API schema)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from consult_web.deps import AppSettings, Card, Db, Storage
from xray_triage import __version__
from xray_triage.store.destinations import destination_states

router = APIRouter()


@router.get("/healthz")
def healthz(request: Request, db: Db, storage: Storage, card: Card, settings: AppSettings) -> JSONResponse:
    """Unauthenticated on purpose: this is what monitoring and the Docker health check read.

    ``storage`` is ``degraded`` (and the status 503) when the data directory's disk has
    less than ``min_free_disk_mb`` free or start-up storage work has not succeeded yet;
    ``disk_free_mb`` says how much is free. ``destinations`` lists each PACS destination's queue
    (``destinations list --json``); one failing for longer than ``destination_failing_degraded_s``
    makes the status ``degraded`` (503) and names it in ``destinations_degraded``.
    ``dicom_receivers`` (only with ``gateway_processes`` > 1): how many receiver processes are
    ``configured`` and ``listening``; fewer listening than configured is ``degraded``.
    """
    state = request.app.state.health
    try:
        with db.session() as session:
            session.execute(text("SELECT 1"))
        database = "ok"
    except Exception as exc:  # report, don't crash
        database = f"error: {type(exc).__name__}"
    destinations: list[dict] = []
    if database == "ok":
        try:
            with db.read_session() as session:
                destinations = destination_states(
                    session, failing_degraded_s=settings.destination_failing_degraded_s
                )
        except Exception:  # noqa: BLE001 - the table is not there yet on a degraded start: storage says why
            destinations = []
    degraded_destinations = [d["name"] for d in destinations if d["state"] == "degraded"]
    report = storage.report()
    ok = (
        database == "ok"
        and report["storage"] == "ok"
        and all(_part_ok(v) for v in state.values())
        and not degraded_destinations
    )
    body = {
        "status": "ok" if ok else "degraded",
        "version": __version__,
        "database": database,
        "model": card.model_version if card else None,
        **report,
        **state,
        "destinations": destinations,
        "destinations_degraded": degraded_destinations,
    }
    # JSON either way (never the HTML error page): monitoring reads which part failed.
    return JSONResponse(body, status_code=200 if ok else 503)


def _part_ok(value: object) -> bool:
    """A part of the server's state: ``"ok"``, or a dict whose ``status`` is (e.g. ``dicom_receivers``:
    ``{"status": "ok", "configured": 3, "listening": 3}``, ``gateway_processes``)."""
    if isinstance(value, dict):
        return value.get("status") == "ok"
    return value == "ok"
