"""FHIR search parameters (R4 3.1.1 Search) parsed into one plain query, per resource type.

Supported, for ImagingStudy, DiagnosticReport and ServiceRequest alike:

* ``patient`` (also ``patient.identifier`` / ``patient:identifier``): the DICOM Patient
  ID, optionally as ``system|value`` (the system is ignored: Patient IDs are matched
  within what the caller may see);
* ``_id``: the resource id (ImagingStudy: the Study Instance UID; DiagnosticReport:
  ``ai-<uid>`` or ``consult-<n>``; ServiceRequest: ``consult-<n>``);
* ``identifier``: ImagingStudy/DiagnosticReport ``urn:dicom:uid|urn:oid:<uid>`` (or just
  ``urn:oid:<uid>`` / ``<uid>``); consults ``urn:xray-triage:consult|<n>``;
* ``study`` (this server's own parameter): the Study Instance UID or ``ImagingStudy/<uid>``;
* ``date``: the study date (ImagingStudy, DiagnosticReport) or the request's date
  (ServiceRequest), ``YYYY-MM-DD`` with prefix ``eq`` (default), ``ge``, ``gt``, ``le``,
  ``lt``; repeat it for a range (``date=ge2024-01-01&date=le2024-01-31``);
* ``_count``: page size (capped by the server's ``fhir_max_count``), ``_offset``: where
  the page starts (what the Bundle's ``next`` link uses).

Any other parameter is refused (:class:`SearchError`, answered 400 with an
OperationOutcome), so a client never mistakes an ignored filter for a match.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, timedelta

KNOWN = {
    "patient",
    "patient.identifier",
    "patient:identifier",
    "_id",
    "identifier",
    "study",
    "date",
    "_count",
    "_offset",
    "_format",
}
DATE = re.compile(r"^(eq|ge|gt|le|lt)?(\d{4}-\d{2}-\d{2})$")


class SearchError(ValueError):
    """A search the server cannot run as asked (unknown parameter, bad value)."""


@dataclass
class Search:
    patient_id: str | None = None
    ids: list[str] = field(default_factory=list)
    identifiers: list[str] = field(default_factory=list)
    study_uid: str | None = None
    date_from: date | None = None  # inclusive
    date_to: date | None = None  # inclusive
    count: int = 50
    offset: int = 0


def _value(raw: str) -> str:
    """``system|value`` -> value."""
    return raw.split("|", 1)[1] if "|" in raw else raw


def parse(params: Iterable[tuple[str, str]], default_count: int, max_count: int) -> Search:
    search = Search(count=min(default_count, max_count))
    for name, raw in params:
        raw = raw.strip()
        if name not in KNOWN:
            raise SearchError(
                f"unsupported search parameter {name!r}; supported: {', '.join(sorted(KNOWN - {'_format'}))}"
            )
        if name == "_format":
            if raw not in ("json", "application/fhir+json", "application/json"):
                raise SearchError("only JSON is served (_format=json)")
        elif name.startswith("patient"):
            search.patient_id = _value(raw)
        elif name == "_id":
            search.ids += [v for v in raw.split(",") if v]
        elif name == "identifier":
            search.identifiers += [_value(v) for v in raw.split(",") if v]
        elif name == "study":
            search.study_uid = raw.removeprefix("ImagingStudy/").removeprefix("urn:oid:")
        elif name == "date":
            _date(search, raw)
        elif name in ("_count", "_offset"):
            if not raw.isdigit():
                raise SearchError(f"{name} must be a whole number")
            if name == "_count":
                search.count = min(int(raw), max_count)
            else:
                search.offset = int(raw)
    return search


def _date(search: Search, raw: str) -> None:
    match = DATE.match(raw)
    if not match:
        raise SearchError(f"date {raw!r}: use YYYY-MM-DD with an optional prefix eq, ge, gt, le or lt")
    prefix, text = match.group(1) or "eq", match.group(2)
    try:
        day = date.fromisoformat(text)
    except ValueError as exc:
        raise SearchError(f"date {raw!r}: {exc}") from exc
    if prefix in ("eq", "ge", "gt"):
        low = day + timedelta(days=1) if prefix == "gt" else day
        search.date_from = max(search.date_from, low) if search.date_from else low
    if prefix in ("eq", "le", "lt"):
        high = day - timedelta(days=1) if prefix == "lt" else day
        search.date_to = min(search.date_to, high) if search.date_to else high


def dicom_date(day: date) -> str:
    return day.strftime("%Y%m%d")
