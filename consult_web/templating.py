"""Jinja2 pages with the user's language, time zone and CSRF token in every context.

Autoescaping is on for every template: user text (replies, annotation labels,
names from DICOM headers) is always shown as text, never as markup.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from consult_web.i18n import (
    LANGUAGES,
    audit_action,
    finding_name,
    format_age,
    format_age_sex,
    format_datetime,
    format_dicom_date,
    format_dicom_time,
    translate,
)
from consult_web.permissions import is_admin
from xray_triage import __version__

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
LANG_COOKIE = "xrt_lang"

environment = Environment(
    loader=FileSystemLoader(TEMPLATES_DIR),
    autoescape=select_autoescape(["html", "xml"], default_for_string=True, default=True),
    trim_blocks=True,
    lstrip_blocks=True,
)


def request_language(request: Request) -> str:
    """The logged-in user's language, else the language cookie, else the server default."""
    user = getattr(request.state, "user", None)
    if user is not None and user.language in LANGUAGES:
        return user.language
    cookie = request.cookies.get(LANG_COOKIE)
    if cookie in LANGUAGES:
        return cookie
    return request.app.state.settings.default_language


def request_timezone(request: Request) -> str:
    user = getattr(request.state, "user", None)
    return user.timezone if user is not None else request.app.state.settings.default_timezone


def base_context(request: Request) -> dict[str, Any]:
    language = request_language(request)
    timezone = request_timezone(request)
    user = getattr(request.state, "user", None)
    card = request.app.state.card
    return {
        "request": request,
        "user": user,
        "is_admin": user is not None and is_admin(user),
        "lang": language,
        "languages": LANGUAGES,
        "t": lambda key, **values: translate(language, key, **values),
        "fmt_dt": lambda value: format_datetime(value, timezone, language),
        "fmt_age": lambda seconds: format_age(seconds, language),
        "fmt_age_sex": lambda age, sex: format_age_sex(age, sex, language),
        "fmt_da": lambda value: format_dicom_date(value, language),
        "fmt_tm": format_dicom_time,
        "finding": lambda label: finding_name(label, language),
        "audit_action": lambda action: audit_action(action, language),
        "csrf_token": user.csrf_token if user is not None else "",
        "model_name": card.name if card is not None else "",
        "model_version": card.model_version if card is not None else "",
        "app_version": __version__,
    }


def render(request: Request, template: str, context: dict[str, Any] | None = None, status_code: int = 200) -> HTMLResponse:
    page = environment.get_template(template).render({**base_context(request), **(context or {})})
    return HTMLResponse(page, status_code=status_code)
