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
    return local.strftime("%d/%m/%Y %H:%M") if language == "vi" else local.strftime("%Y-%m-%d %H:%M")


def format_age(seconds: float, language: str) -> str:
    """Time since arrival, short: '5 min', '3 h 10 min', '2 d'."""
    minutes = int(max(seconds, 0) // 60)
    if minutes < 60:
        return translate(language, "time.minutes", n=minutes)
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return translate(language, "time.hours_minutes", h=hours, m=minutes)
    return translate(language, "time.days", n=hours // 24)
