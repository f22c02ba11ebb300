"""C-FIND matching and C-MOVE / C-GET instance selection over the study store.

Study Root Query/Retrieve (PS3.4 Annex C), levels STUDY, SERIES and IMAGE. The
gateway's handlers (``dicom_gateway/qr.py``) call :func:`find` and
:func:`instances_to_retrieve`; both take a :class:`Scope` saying which station's
studies the caller may see (``None`` station: every station's), so access is decided
once, here, in SQL.

Matching (PS3.4 C.2.2.2), on the keys the store holds:

* universal matching: a key sent empty matches everything and is returned filled;
* single value, and wildcard ``*`` / ``?`` on PatientID, PatientName,
  AccessionNumber, StudyDescription, Modality, SeriesDescription (SQL ``LIKE``;
  case-insensitive for ASCII on SQLite, which PS3.4 C.2.2.2.4 allows for PN);
* UID list matching (``uid1\\uid2``) on StudyInstanceUID, SeriesInstanceUID,
  SOPInstanceUID, SOPClassUID;
* range matching on StudyDate (``YYYYMMDD-YYYYMMDD``, ``-YYYYMMDD``, ``YYYYMMDD-``);
* ModalitiesInStudy: a study matches when one of its series has one of the values.

A key the store does not hold is returned empty (zero length) and does not restrict
the match, as PS3.4 C.2.2.1.2 allows for optional keys. Quarantined instances are in no
study and are never found.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import ColumnElement, Select, and_, exists, func, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from xray_triage.store.schema import Instance, Series, Study

LEVELS = ("STUDY", "SERIES", "IMAGE")
# Results carry Unicode text as stored (decoded at ingest): UTF-8 on the wire.
RESPONSE_CHARACTER_SET = "ISO_IR 192"


class QueryError(ValueError):
    """The identifier cannot be matched (missing or unknown level, bad date range...).

    The gateway answers it with C-FIND/C-MOVE/C-GET status 0xA900 (Identifier does not
    match SOP Class) or 0xC000 (Unable to process) and this message as Error Comment.
    """


@dataclass(frozen=True)
class Scope:
    """What a caller may see: ``station_ae`` set = only that station's studies; None = all."""

    station_ae: str | None

    def clause(self) -> ColumnElement[bool]:
        if self.station_ae is None:
            return Study.id.is_not(None)
        return Study.station_ae == self.station_ae


@dataclass(frozen=True)
class StoredInstance:
    """One instance to send by C-MOVE / C-GET: where its file is, as stored."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    file_path: str  # relative to the data directory


def query_level(identifier: Dataset) -> str:
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if level not in LEVELS:
        raise QueryError(f"QueryRetrieveLevel must be one of {', '.join(LEVELS)} (got {level or 'none'!r})")
    return level


def _text(identifier: Dataset, keyword: str) -> str:
    value = identifier.get(keyword)
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value).strip()
    return str(value).strip()


def _wildcard(
    column: InstrumentedAttribute[str], value: str, *, ignore_case: bool = False
) -> ColumnElement[bool]:
    """Single value or ``*``/``?`` wildcard matching (PS3.4 C.2.2.2.1 and C.2.2.2.3); ``ignore_case``
    for PatientName (PN), the same on SQLite and PostgreSQL (whose LIKE is case-sensitive)."""
    if "*" not in value and "?" not in value:
        return func.lower(column) == value.lower() if ignore_case else column == value
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    pattern = escaped.replace("*", "%").replace("?", "_")
    return column.ilike(pattern, escape="\\") if ignore_case else column.like(pattern, escape="\\")


def _uid_list(column: InstrumentedAttribute[str], value: str) -> ColumnElement[bool]:
    """List of UID matching (PS3.4 C.2.2.2.2): ``uid1\\uid2``."""
    uids = [u.strip() for u in value.split("\\") if u.strip()]
    return column.in_(uids)


def _date_range(column: InstrumentedAttribute[str], value: str) -> ColumnElement[bool]:
    """Single date or range matching on a DA stored as YYYYMMDD (PS3.4 C.2.2.2.5)."""
    if "-" not in value:
        _check_date(value)
        return column == value
    low, _, high = value.partition("-")
    low, high = low.strip(), high.strip()
    clauses = []
    if low:
        _check_date(low)
        clauses.append(column >= low)
    if high:
        _check_date(high)
        clauses.append(column <= high)
    if not clauses:
        raise QueryError("a date range needs at least one end")
    return and_(column != "", *clauses)


def _check_date(value: str) -> None:
    if len(value) != 8 or not value.isdigit():
        raise QueryError(f"date {value!r} is not YYYYMMDD")


STUDY_WILDCARD_KEYS: dict[str, InstrumentedAttribute[str]] = {
    "PatientID": Study.patient_id,
    "PatientName": Study.patient_name,
    "AccessionNumber": Study.accession_number,
    "StudyDescription": Study.description,
    "PatientSex": Study.patient_sex,
}
SERIES_WILDCARD_KEYS: dict[str, InstrumentedAttribute[str]] = {
    "Modality": Series.modality,
    "SeriesDescription": Series.description,
    "SeriesNumber": Series.series_number,
    "BodyPartExamined": Series.body_part,
}
IMAGE_WILDCARD_KEYS: dict[str, InstrumentedAttribute[str]] = {
    "InstanceNumber": Instance.instance_number,
}


def _study_clauses(identifier: Dataset) -> list[ColumnElement[bool]]:
    clauses: list[ColumnElement[bool]] = []
    for keyword, column in STUDY_WILDCARD_KEYS.items():
        if value := _text(identifier, keyword):
            clauses.append(_wildcard(column, value, ignore_case=keyword == "PatientName"))
    if value := _text(identifier, "StudyInstanceUID"):
        clauses.append(_uid_list(Study.study_instance_uid, value))
    if value := _text(identifier, "StudyDate"):
        clauses.append(_date_range(Study.study_date, value))
    if value := _text(identifier, "ModalitiesInStudy"):
        modalities = [m.strip() for m in value.split("\\") if m.strip()]
        clauses.append(
            exists(select(Series.id).where(Series.study_id == Study.id, Series.modality.in_(modalities)))
        )
    return clauses


def _series_clauses(identifier: Dataset) -> list[ColumnElement[bool]]:
    clauses: list[ColumnElement[bool]] = []
    for keyword, column in SERIES_WILDCARD_KEYS.items():
        if value := _text(identifier, keyword):
            clauses.append(_wildcard(column, value))
    if value := _text(identifier, "SeriesInstanceUID"):
        clauses.append(_uid_list(Series.series_instance_uid, value))
    return clauses


def _image_clauses(identifier: Dataset) -> list[ColumnElement[bool]]:
    clauses: list[ColumnElement[bool]] = []
    for keyword, column in IMAGE_WILDCARD_KEYS.items():
        if value := _text(identifier, keyword):
            clauses.append(_wildcard(column, value))
    if value := _text(identifier, "SOPInstanceUID"):
        clauses.append(_uid_list(Instance.sop_instance_uid, value))
    if value := _text(identifier, "SOPClassUID"):
        clauses.append(_uid_list(Instance.sop_class_uid, value))
    return clauses


def _statement(level: str, identifier: Dataset, scope: Scope) -> Select[Any]:
    """Rows of the asked level (Study; Study, Series; or Study, Series, Instance)."""
    clauses = [scope.clause(), *_study_clauses(identifier)]
    if level == "STUDY":
        return select(Study).where(*clauses).order_by(Study.id)
    clauses += _series_clauses(identifier)
    if level == "SERIES":
        return (
            select(Study, Series)
            .join(Series, Series.study_id == Study.id)
            .where(*clauses)
            .order_by(Series.id)
        )
    clauses += _image_clauses(identifier)
    return (
        select(Study, Series, Instance)
        .join(Series, Series.study_id == Study.id)
        .join(Instance, Instance.series_id == Series.id)
        .where(*clauses)
        .order_by(Instance.id)
    )


class TooManyMatches(QueryError):
    """More matches than the caller's limit: answered 0xA700 Refused: Out of resources (PS3.4 C.4.1.1.4)."""


def find(session: Session, identifier: Dataset, scope: Scope, limit: int | None = None) -> Iterator[Dataset]:
    """Yield one C-FIND response identifier per match (PS3.4 C.4.1.3.1).

    Each response has the request's keys, filled where the store knows the value (empty
    otherwise), plus QueryRetrieveLevel and SpecificCharacterSet. Raises QueryError for
    an identifier that cannot be matched, TooManyMatches (before yielding anything) when
    there are more than ``limit`` matches.
    """
    level = query_level(identifier)
    statement = _statement(level, identifier, scope)
    if limit is not None:
        statement = statement.limit(limit + 1)
    rows = session.execute(statement).all()
    if limit is not None and len(rows) > limit:
        raise TooManyMatches(f"more than {limit} matches; narrow the query")
    counts = _counts(session, level, [row[0].id for row in rows]) if rows else {}
    for row in rows:
        study = row[0]
        series = row[1] if level != "STUDY" else None
        instance = row[2] if level == "IMAGE" else None
        known = _known_values(study, series, instance, counts)
        yield _response(identifier, level, known)


def _counts(session: Session, level: str, study_ids: list[int]) -> dict[str, Any]:
    """Modalities and related-object counts of the matched studies and series (two queries)."""
    modalities: dict[int, list[str]] = {}
    for study_id, modality in session.execute(
        select(Series.study_id, Series.modality).where(Series.study_id.in_(set(study_ids))).distinct()
    ):
        if modality:
            modalities.setdefault(study_id, []).append(modality)
    per_series = dict(
        session.execute(
            select(Series.id, func.count(Instance.id))
            .join(Instance, Instance.series_id == Series.id)
            .where(Series.study_id.in_(set(study_ids)))
            .group_by(Series.id)
        ).all()
    )
    series_of_study: dict[int, list[int]] = {}
    for series_id, study_id in session.execute(
        select(Series.id, Series.study_id).where(Series.study_id.in_(set(study_ids)))
    ):
        series_of_study.setdefault(study_id, []).append(series_id)
    return {"modalities": modalities, "per_series": per_series, "series_of_study": series_of_study}


def _known_values(
    study: Study, series: Series | None, instance: Instance | None, counts: dict[str, Any]
) -> dict[str, Any]:
    series_ids = counts["series_of_study"].get(study.id, [])
    known: dict[str, Any] = {
        "PatientID": study.patient_id,
        "PatientName": study.patient_name,
        "PatientSex": study.patient_sex,
        "PatientBirthDate": study.patient_birth_date,
        "PatientAge": study.patient_age,
        "StudyInstanceUID": study.study_instance_uid,
        "StudyDate": study.study_date,
        "StudyTime": study.study_time,
        "AccessionNumber": study.accession_number,
        "StudyDescription": study.description,
        "InstitutionName": study.institution_name,
        "ModalitiesInStudy": sorted(counts["modalities"].get(study.id, [])),
        "NumberOfStudyRelatedSeries": len(series_ids),
        "NumberOfStudyRelatedInstances": sum(counts["per_series"].get(s, 0) for s in series_ids),
    }
    if series is not None:
        known |= {
            "SeriesInstanceUID": series.series_instance_uid,
            "Modality": series.modality,
            "SeriesNumber": series.series_number,
            "SeriesDescription": series.description,
            "BodyPartExamined": series.body_part,
            "NumberOfSeriesRelatedInstances": counts["per_series"].get(series.id, 0),
        }
    if instance is not None:
        known |= {
            "SOPInstanceUID": instance.sop_instance_uid,
            "SOPClassUID": instance.sop_class_uid,
            "InstanceNumber": instance.instance_number,
            "ViewPosition": instance.view_position,
            "Rows": instance.rows,
            "Columns": instance.columns,
        }
    return known


def _response(identifier: Dataset, level: str, known: dict[str, Any]) -> Dataset:
    response = Dataset()
    response.SpecificCharacterSet = RESPONSE_CHARACTER_SET
    for element in identifier:
        keyword = element.keyword
        if not keyword or keyword in ("SpecificCharacterSet", "QueryRetrieveLevel"):
            continue
        value = known.get(keyword)
        if value in (None, "", []):
            setattr(response, keyword, None)  # asked for, not known: returned empty
        else:
            setattr(response, keyword, value)
    response.QueryRetrieveLevel = level
    return response


def instances_to_retrieve(session: Session, identifier: Dataset, scope: Scope) -> list[StoredInstance]:
    """The instances a C-MOVE / C-GET identifier names (PS3.4 C.4.2.2.1, C.4.3.2.1).

    Study Root: STUDY level needs StudyInstanceUID(s), SERIES level SeriesInstanceUID(s),
    IMAGE level SOPInstanceUID(s) (unique keys, UID lists allowed). Raises QueryError when
    the level's unique key is missing. Studies outside ``scope`` are not found (an empty
    list, as for UIDs that do not exist).
    """
    level = query_level(identifier)
    key = {"STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}[level]
    value = _text(identifier, key)
    if not value:
        raise QueryError(f"a {level} level retrieve needs {key}")
    column = {
        "STUDY": Study.study_instance_uid,
        "SERIES": Series.series_instance_uid,
        "IMAGE": Instance.sop_instance_uid,
    }[level]
    statement = (
        select(
            Instance.sop_instance_uid,
            Instance.sop_class_uid,
            Instance.transfer_syntax_uid,
            Instance.file_path,
        )
        .join(Series, Instance.series_id == Series.id)
        .join(Study, Series.study_id == Study.id)
        .where(scope.clause(), _uid_list(column, value))
        .order_by(Instance.id)
    )
    return [StoredInstance(*row) for row in session.execute(statement)]


__all__ = [
    "LEVELS",
    "QueryError",
    "Scope",
    "StoredInstance",
    "TooManyMatches",
    "find",
    "instances_to_retrieve",
    "query_level",
]
