"""Admin pages: users (add, disable, enable), stations (add, remove), quarantined images,
the storage's degraded state, the PACS destinations' queues and the audit log."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select

from consult_web.audit import audit
from consult_web.deps import AdminUser, Db, Storage
from consult_web.errors import LocalizedError
from consult_web.templating import render
from xray_triage.store.consult_schema import ROLES, AuditEvent
from xray_triage.store.db import Database
from xray_triage.store.destinations import destination_states
from xray_triage.store.diskspace import StorageGuard
from xray_triage.store.records import list_quarantined
from xray_triage.store.stations import StationError, add_station, list_stations, remove_station
from xray_triage.store.users import UserError, add_user, list_users, set_disabled

router = APIRouter(prefix="/admin")


def _admin_page(
    request: Request, db: Database, storage: StorageGuard, error: str = "", status_code: int = 200
) -> HTMLResponse:
    with db.session() as session:
        users = list_users(session)
        stations = list_stations(session)
        events = list(session.scalars(select(AuditEvent).order_by(AuditEvent.id.desc()).limit(100)))
        quarantined = list_quarantined(session)
        context = {
            "users": users,
            "stations": stations,
            "events": events,
            "roles": ROLES,
            "error": error,
            "quarantined": quarantined,
            "storage": storage.report(),
            "destinations": _destinations(session, request.app.state.settings.destination_failing_degraded_s),
        }
        return render(request, "admin.html", context, status_code=status_code)


@router.get("")
def admin_page(request: Request, _admin: AdminUser, db: Db, storage: Storage) -> HTMLResponse:
    return _admin_page(request, db, storage)


@router.post("/users")
def admin_add_user(
    request: Request,
    username: str = Form(..., max_length=64),
    password: str = Form(..., max_length=1024),
    role: str = Form(...),
    station_ae: str = Form("", max_length=16),
    display_name: str = Form("", max_length=200),
    language: str = Form("vi"),
    timezone: str = Form("Asia/Ho_Chi_Minh", max_length=64),
    *,
    admin: AdminUser,
    db: Db,
    storage: Storage,
) -> Response:
    try:
        with db.session() as session:
            add_user(
                session, username, password, role, station_ae=station_ae or None,
                display_name=display_name, language=language, timezone=timezone.strip(),
            )  # fmt: skip
            audit(session, admin, "user.add", request=request, target=username, role=role)
    except UserError as exc:
        return _admin_page(request, db, storage, str(exc), 400)
    return RedirectResponse("/admin#users", status_code=303)


@router.post("/users/{username}/disabled")
def admin_disable_user(
    request: Request, username: str, admin: AdminUser, db: Db, storage: Storage, disabled: bool = Form(...)
) -> Response:
    if username == admin.username and disabled:
        raise LocalizedError(400, "usererror.cannot_disable_self")
    try:
        with db.session() as session:
            set_disabled(session, username, disabled)
            audit(session, admin, "user.disable" if disabled else "user.enable", request=request, target=username)
    except UserError as exc:
        return _admin_page(request, db, storage, str(exc), 404)
    return RedirectResponse("/admin#users", status_code=303)


@router.post("/stations")
def admin_add_station(
    request: Request,
    ae_title: str = Form(..., max_length=16),
    name: str = Form("", max_length=200),
    allowed_ips: str = Form("", max_length=1000),
    *,
    admin: AdminUser,
    db: Db,
    storage: Storage,
) -> Response:
    try:
        with db.session() as session:
            add_station(session, ae_title, name, allowed_ips or None)
            audit(session, admin, "station.add", request=request, target=ae_title)
    except StationError as exc:
        return _admin_page(request, db, storage, str(exc), 400)
    return RedirectResponse("/admin#stations", status_code=303)


@router.post("/stations/{ae_title}/remove")
def admin_remove_station(request: Request, ae_title: str, admin: AdminUser, db: Db) -> Response:
    with db.session() as session:
        if not remove_station(session, ae_title):
            raise LocalizedError(404, "usererror.no_station", ae_title=repr(ae_title))
        audit(session, admin, "station.remove", request=request, target=ae_title)
    return RedirectResponse("/admin#stations", status_code=303)


def _destinations(session, failing_degraded_s: float) -> list[dict]:  # type: ignore[no-untyped-def]
    """``destination_states`` with its times as datetimes, for ``fmt_dt`` in the user's zone."""
    rows = destination_states(session, failing_degraded_s=failing_degraded_s)
    for row in rows:
        for key in ("last_error_at", "last_success_at", "failing_since"):
            row[key] = datetime.fromisoformat(row[key]) if row[key] else None
    return rows
