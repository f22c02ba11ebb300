"""Vietnamese and English strings for every page, and dates in the user's time zone.

Catalogs are JSON files under ``locales/<lang>/*.json`` (one file per part of the
UI, merged), so translators edit data, not code. A key missing from a language
falls back to English and then to the key itself, and a unit test checks that
both languages define the same keys and that every key used in the templates
and scripts exists.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from xray_triage.store.consult_schema import LANGUAGES as LANGUAGES  # re-exported for the web app

LOCALES_DIR = Path(__file__).resolve().parent / "locales"
FALLBACK = "en"


@functools.cache
def catalog(language: str) -> dict[str, str]:
    """All strings of one language (cached: catalogs are read once per process)."""
    merged: dict[str, str] = {}
    for path in sorted((LOCALES_DIR / language).glob("*.json")):
        merged.update(json.loads(path.read_text(encoding="utf-8")))
    return merged


def translate(language: str, key: str, **values: object) -> str:
    text = catalog(language).get(key) or catalog(FALLBACK).get(key) or key
    return text.format(**values) if values else text


def zone(name: str | None) -> ZoneInfo:
    try:
        return ZoneInfo(name or "Asia/Ho_Chi_Minh")
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("Asia/Ho_Chi_Minh")


def format_datetime(value: datetime | None, timezone: str | None, language: str) -> str:
    """``25/11/2026 14:05`` (vi) or ``2026-11-25 14:05`` (en), in the user's zone."""
    if value is None:
        return ""
    local = value.astimezone(zone(timezone))
    return local.strftime(f"{date_pattern(language)} %H:%M")


def format_age(seconds: float, language: str) -> str:
    """Time since arrival, short: '5 min', '3 h 10 min', '2 d'."""
    minutes = int(max(seconds, 0) // 60)
    if minutes < 60:
        return translate(language, "time.minutes", n=minutes)
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return translate(language, "time.hours_minutes", h=hours, m=minutes)
    return translate(language, "time.days", n=hours // 24)


def finding_name(label: str, language: str) -> str:
    """A model label (``Effusion``, ``Pleural_Thickening``) in the user's language.

    Labels come from the model card, so an unknown one is shown as the card names it
    (underscores as spaces) rather than hidden.
    """
    text = catalog(language).get(f"finding.{label}") or catalog(FALLBACK).get(f"finding.{label}")
    return text or label.replace("_", " ")


def format_patient_age(value: str | None, language: str) -> str:
    """A DICOM Age String (PS3.5 §6.2, AS: ``nnnD|W|M|Y``) as ``67 tuổi`` / ``67 y``.

    ``067Y`` → ``67 tuổi`` (vi) / ``67 y`` (en); days, weeks and months likewise. A value
    that is not a valid AS (some modalities write ``67``) is shown as it is.
    """
    text = (value or "").strip()
    if len(text) == 4 and text[:3].isdigit() and text[3] in "DWMY":
        return translate(language, f"age.{text[3]}", n=int(text[:3]))
    return text


def format_sex(value: str | None, language: str) -> str:
    """DICOM PatientSex (PS3.3 C.7.1.1: ``M``, ``F``, ``O``) as a word; other values as they are."""
    text = (value or "").strip().upper()
    return translate(language, f"sex.{text}") if text in ("M", "F", "O") else (value or "").strip()


def format_age_sex(age: str | None, sex: str | None, language: str) -> str:
    """``67 tuổi, Nam`` / ``67 y, Male``: the parts that are known, comma-separated."""
    return ", ".join(part for part in (format_patient_age(age, language), format_sex(sex, language)) if part)


def date_pattern(language: str) -> str:
    """The one date format of a page in ``language`` (``format_datetime`` uses the same)."""
    return "%d/%m/%Y" if language == "vi" else "%Y-%m-%d"


def format_dicom_date(value: str | None, language: str) -> str:
    """A DICOM Date (PS3.5 §6.2, DA: ``YYYYMMDD``) in the page's date format; other text as it is."""
    text = (value or "").strip()
    try:
        day = datetime.strptime(text, "%Y%m%d")
    except ValueError:
        return text
    return day.strftime(date_pattern(language))


def format_dicom_time(value: str | None) -> str:
    """A DICOM Time (PS3.5 §6.2, TM: ``HHMMSS.FFFFFF``, parts optional) as ``14:49``; other text as it is."""
    text = (value or "").strip()
    if len(text) >= 4 and text[:4].isdigit() and int(text[:2]) < 24 and int(text[2:4]) < 60:
        return f"{text[:2]}:{text[2:4]}"
    return text


def audit_action(action: str, language: str) -> str:
    """An audit action (``study.view``, ``user.add``) as a phrase; unknown actions as stored."""
    return catalog(language).get(f"audit.{action}") or catalog(FALLBACK).get(f"audit.{action}") or action
