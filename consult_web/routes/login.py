"""Login, logout and the language switch.

The login form is protected against login CSRF with a double-submit cookie; failed
logins are counted per user name and client IP, per IP and per user name
(``auth.LoginLimiter``) and locked out with 429 past the configured limits.
"""

from __future__ import annotations

import secrets
from datetime import timedelta
from urllib.parse import urlsplit

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response

from consult_web.audit import audit
from consult_web.auth import SESSION_COOKIE, client_ip
from consult_web.deps import AppSettings, CurrentUser, Db
from consult_web.i18n import LANGUAGES
from consult_web.templating import LANG_COOKIE, render
from xray_triage.store.consult_schema import User
from xray_triage.store.users import (
    UserError,
    check_timezone,
    create_session,
    end_session,
    record_login,
    verify_login,
)

router = APIRouter()
LOGIN_CSRF_COOKIE = "xrt_login_csrf"


def _safe_next(target: str | None) -> str:
    """Only local paths: never redirect a user to another site after login."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")) or urlsplit(target).netloc:
        return "/worklist"
    return target


def _secure(request: Request) -> bool:
    mode = request.app.state.settings.cookie_secure
    return mode == "always" or (mode == "auto" and request.url.scheme == "https")


def _login_page(request: Request, next_url: str, error: str = "", status_code: int = 200, username: str = "") -> Response:
    token = secrets.token_urlsafe(24)
    response = render(
        request,
        "login.html",
        {"next": next_url, "error": error, "login_csrf": token, "username": username},
        status_code=status_code,
    )
    response.set_cookie(
        LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", secure=_secure(request), path="/login"
    )
    return response


@router.get("/", include_in_schema=False)
def index() -> Response:
    return RedirectResponse("/worklist", status_code=303)


@router.get("/login")
def login_form(request: Request, next: str | None = None) -> Response:  # noqa: A002 (query name)
    return _login_page(request, _safe_next(next))


@router.post("/login")
def login(
    request: Request,
    username: str = Form(..., max_length=64),
    password: str = Form(..., max_length=1024),
    login_csrf: str = Form(""),
    next: str = Form("/worklist"),  # noqa: A002
    *,
    db: Db,
    settings: AppSettings,
) -> Response:
    next_url = _safe_next(next)
    cookie = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not cookie or not secrets.compare_digest(cookie, login_csrf):
        return _login_page(request, next_url, "login.expired", 403, username)
    limiter = request.app.state.limiter
    ip = client_ip(request)
    wait = limiter.retry_after(username, ip)
    if wait > 0:
        response = _login_page(request, next_url, "login.locked", 429, username)
        response.headers["Retry-After"] = str(int(wait) + 1)
        return response
    user_id = verify_login(db, username, password)
    with db.session() as session:
        if user_id is None:
            audit(session, None, "login.failed", request=request, username=username)
            limiter.failed(username, ip, session)  # shared with every web process, in this transaction
        else:
            user = record_login(session, user_id, password)
            token = create_session(session, user, lifetime=timedelta(hours=settings.session_hours), ip=ip)
            audit(session, None, "login", request=request, username=user.username)
            limiter.succeeded(username, ip, session)
    if user_id is None:
        return _login_page(request, next_url, "login.failed", 401, username)
    response = RedirectResponse(next_url, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=int(settings.session_hours * 3600),
        httponly=True,
        samesite="lax",
        secure=_secure(request),
        path="/",
    )
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
    return response


@router.post("/logout")
def logout(request: Request, user: CurrentUser, db: Db) -> Response:
    with db.session() as session:
        end_session(session, request.cookies.get(SESSION_COOKIE, ""))
        audit(session, user, "logout", request=request)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


@router.post("/settings/language")
def set_language(
    request: Request,
    language: str = Form(...),
    next: str = Form("/worklist"),  # noqa: A002
    *,
    user: CurrentUser,
    db: Db,
) -> Response:
    """Per-user language (stored on the user, so it follows them to any browser)."""
    if language in LANGUAGES:
        with db.session() as session:
            row = session.get(User, user.id)
            if row is not None:
                row.language = language
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(LANG_COOKIE, language, samesite="lax", secure=_secure(request), max_age=365 * 86400)
    return response


@router.get("/settings")
def settings_page(request: Request, _user: CurrentUser) -> Response:
    return render(request, "settings.html", {"saved": request.query_params.get("saved") == "1", "error": ""})


@router.post("/settings")
def save_settings(
    request: Request,
    timezone: str = Form(..., max_length=64),
    *,
    user: CurrentUser,
    db: Db,
) -> Response:
    """The user's own time zone: every date in the UI is shown in it."""
    try:
        zone_name = check_timezone(timezone.strip())
    except UserError as exc:
        return render(request, "settings.html", {"saved": False, "error": str(exc)}, status_code=400)
    with db.session() as session:
        row = session.get(User, user.id)
        if row is not None:
            row.timezone = zone_name
    return RedirectResponse("/settings?saved=1", status_code=303)


@router.get("/login/language/{language}")
def anonymous_language(request: Request, language: str) -> Response:
    """Language switch on the login page (before anyone is logged in): a cookie only."""
    response = RedirectResponse("/login", status_code=303)
    if language in LANGUAGES:
        response.set_cookie(LANG_COOKIE, language, samesite="lax", secure=_secure(request), max_age=365 * 86400)
    return response
