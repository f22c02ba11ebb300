"""QIDO-RS in core: match keys, paging and the DICOM JSON model of what the store knows.

PS3.18 8.3.4 (query parameters) and 10.6 (Search Transaction): a query is a list of
``{attributeID}={value}`` match keys, ``limit``/``offset`` paging, ``includefield`` and
``fuzzymatching``. Matching follows PS3.4 C.2.2.2 as far as the store's columns allow:

- single value match, wildcards ``*`` and ``?`` (PatientName, PatientID, AccessionNumber,
  descriptions), case-insensitive as SQL ``LIKE`` is;
- UID list match (``StudyInstanceUID=1.2,1.3``; commas or backslashes);
- range match on dates (``StudyDate=20240101-20240131``, ``-20240131``, ``20240101-``);
- ModalitiesInStudy: any series of the study with one of the listed modalities.

Results are the DICOM JSON model (PS3.18 F.2) built from the rows in the shape pydicom's
``Dataset.to_json_dict`` gives a stored file's ``/metadata`` (a unit test holds the two equal). Instances are read generically (every row of ``instances``, whatever its SOP
class), so objects this server makes itself are served like received ones.

Everything here takes a ``visibility`` WHERE clause on ``Study`` (the caller's access rule),
so a station user's query never sees another station's study, however it is phrased.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from sqlalchemy import ColumnElement, Integer, and_, case, distinct, func, literal, select, union_all
from sqlalchemy.orm import Session

from xray_triage.store.result_objects import ResultObject
from xray_triage.store.schema import Instance, Series, Study

LEVEL_STUDY = "study"
LEVEL_SERIES = "series"
LEVEL_INSTANCE = "instance"

# The JSON text is UTF-8 (PS3.18 F.2.1); the rows hold decoded text.
UTF8_CHARSET = "ISO_IR 192"

# Keyword -> column, per level. A key of an upper level may be used at a lower one
# (PS3.18 10.6.1.2: e.g. PatientID on /series, to match the series of that patient's studies).
STUDY_COLUMNS: dict[str, Any] = {
    "StudyInstanceUID": Study.study_instance_uid,
    "PatientID": Study.patient_id,
    "PatientName": Study.patient_name,
    "PatientSex": Study.patient_sex,
    "PatientBirthDate": Study.patient_birth_date,
    "StudyDate": Study.study_date,
    "StudyTime": Study.study_time,
    "AccessionNumber": Study.accession_number,
    "StudyDescription": Study.description,
    "InstitutionName": Study.institution_name,
}
# What modality a made object's series has, from its SOP class (PS3.3 C.7.3.1.1.1).
_MODALITY_OF_MADE = case(
    (ResultObject.sop_class_uid.like("1.2.840.10008.5.1.4.1.1.88.%"), "SR"),
    (ResultObject.sop_class_uid.like("1.2.840.10008.5.1.4.1.1.11.%"), "PR"),
    else_="OT",
)
RECEIVED, MADE = 0, 1


def _served() -> Any:
    """Every instance the store serves, as one selectable: the received ones (``instances``
    with their ``series``) and the objects this server made (``result_objects``: AI SR/GSPS,
    specialist GSPS, consult SR, filed in the study like received instances). Reading this,
    never one table, is what makes every SOP class appear in search and retrieve alike."""
    received = select(
        Series.study_id.label("study_id"),
        Series.series_instance_uid.label("series_uid"),
        Series.modality.label("modality"),
        Series.series_number.label("series_number"),
        Series.description.label("series_description"),
        Series.body_part.label("body_part"),
        Instance.sop_instance_uid.label("sop_uid"),
        Instance.sop_class_uid.label("sop_class_uid"),
        Instance.transfer_syntax_uid.label("transfer_syntax_uid"),
        Instance.instance_number.label("instance_number"),
        Instance.view_position.label("view_position"),
        Instance.rows.label("rows"),
        Instance.columns.label("columns"),
        Instance.file_path.label("file_path"),
        literal(RECEIVED).label("origin"),
        Instance.id.label("row_id"),
    ).join(Series, Instance.series_id == Series.id)
    made = select(
        ResultObject.study_id,
        ResultObject.series_instance_uid,
        _MODALITY_OF_MADE,
        literal(""),
        literal(""),
        literal(""),
        ResultObject.sop_instance_uid,
        ResultObject.sop_class_uid,
        ResultObject.transfer_syntax_uid,
        literal(""),
        literal(""),
        literal(None, Integer),
        literal(None, Integer),
        ResultObject.file_path,
        literal(MADE),
        ResultObject.id,
    )
    return union_all(received, made).subquery("served")


SERVED = _served()
SERIES_COLUMNS: dict[str, Any] = {
    "SeriesInstanceUID": SERVED.c.series_uid,
    "Modality": SERVED.c.modality,
    "BodyPartExamined": SERVED.c.body_part,
    "SeriesNumber": SERVED.c.series_number,
    "SeriesDescription": SERVED.c.series_description,
}
INSTANCE_COLUMNS: dict[str, Any] = {
    "SOPInstanceUID": SERVED.c.sop_uid,
    "SOPClassUID": SERVED.c.sop_class_uid,
    "InstanceNumber": SERVED.c.instance_number,
    "ViewPosition": SERVED.c.view_position,
}
LEVEL_COLUMNS = {
    LEVEL_STUDY: STUDY_COLUMNS,
    LEVEL_SERIES: {**STUDY_COLUMNS, **SERIES_COLUMNS},
    LEVEL_INSTANCE: {**STUDY_COLUMNS, **SERIES_COLUMNS, **INSTANCE_COLUMNS},
}
UID_KEYS = {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"}
RANGE_KEYS = {"StudyDate", "StudyTime", "PatientBirthDate"}
PARAMETERS = {"limit", "offset", "includefield", "fuzzymatching"}


class QueryError(ValueError):
    """A query the server cannot run (bad value, unknown parameter): answered 400."""


@dataclass
class QidoQuery:
    """A parsed QIDO-RS query; ``ignored`` are match keys this server does not support
    (PS3.18 8.3.4.1: answered with a Warning header, not an error)."""

    matches: dict[str, str] = field(default_factory=dict)
    modalities_in_study: list[str] = field(default_factory=list)
    limit: int | None = None
    offset: int = 0
    include_all: bool = False
    ignored: list[str] = field(default_factory=list)


def _keyword(attribute: str) -> str:
    """``PatientID`` or ``00100020`` -> ``PatientID``; nested paths (``a.b``) are unsupported."""
    if len(attribute) == 8 and all(c in "0123456789abcdefABCDEF" for c in attribute):
        return keyword_for_tag(int(attribute, 16)) or attribute
    return attribute


def parse_query(params: Iterable[tuple[str, str]], level: str, *, max_limit: int) -> QidoQuery:
    """Read the query string's pairs for a search at ``level``; raises QueryError (-> 400).

    ``limit`` is capped at ``max_limit`` (PS3.18 8.3.4.4 lets the origin server limit results).
    """
    query = QidoQuery(limit=max_limit)
    columns = LEVEL_COLUMNS[level]
    for name, value in params:
        if name == "limit":
            query.limit = min(_non_negative(name, value), max_limit)
        elif name == "offset":
            query.offset = _non_negative(name, value)
        elif name == "includefield":
            query.include_all = query.include_all or "all" in value.split(",")
        elif name == "fuzzymatching":
            if value not in ("true", "false"):
                raise QueryError("fuzzymatching must be true or false")
        else:
            keyword = _keyword(name)
            if keyword == "ModalitiesInStudy":
                query.modalities_in_study = [v for v in _values(value) if v]
            elif keyword in columns:
                if value:  # an empty value is universal matching: return the attribute, match all
                    query.matches[keyword] = value
            elif tag_for_keyword(keyword) is not None:
                query.ignored.append(keyword)
            else:
                raise QueryError(f"unknown query parameter: {name}")
    return query


def _non_negative(name: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise QueryError(f"{name} must be an integer") from None
    if number < 0:
        raise QueryError(f"{name} must not be negative")
    return number


def _values(value: str) -> list[str]:
    """A list of values: QIDO-RS separates them with commas, DICOM with backslashes."""
    return [v.strip() for v in value.replace("\\", ",").split(",")]


def _like_pattern(value: str) -> str:
    escaped = value.replace("!", "!!").replace("%", "!%").replace("_", "!_")
    return escaped.replace("*", "%").replace("?", "_")


def match_clause(keyword: str, column: Any, value: str) -> ColumnElement[bool]:
    """One match key as a WHERE clause (PS3.4 C.2.2.2)."""
    if keyword in UID_KEYS:
        uids = [v for v in _values(value) if v]
        if any("*" in v or "?" in v for v in uids):
            raise QueryError(f"{keyword}: wildcards are not allowed in UID matching")
        return column.in_(uids)
    if keyword in RANGE_KEYS and "-" in value:
        low, _, high = value.partition("-")
        low, high = low.strip(), high.strip()
        if not low and not high:
            raise QueryError(f"{keyword}: a range needs at least one end")
        if keyword != "StudyTime" and not all(part.isdigit() for part in (low, high) if part):
            raise QueryError(f"{keyword}: dates are YYYYMMDD")
        parts = [column != ""]
        if low:
            parts.append(column >= low)
        if high:
            parts.append(column <= high + ("\uffff" if keyword == "StudyTime" else ""))
        return and_(*parts)
    if keyword == "PatientName":  # PN: case-insensitive, on SQLite and PostgreSQL (whose LIKE is not)
        if "*" in value or "?" in value:
            return column.ilike(_like_pattern(value), escape="!")
        return func.lower(column) == value.lower()
    if "*" in value or "?" in value:
        return column.like(_like_pattern(value), escape="!")
    return column == value


def _clauses(query: QidoQuery, level: str) -> list[ColumnElement[bool]]:
    columns = LEVEL_COLUMNS[level]
    clauses = [match_clause(k, columns[k], v) for k, v in query.matches.items()]
    if query.modalities_in_study:
        clauses.append(
            Study.id.in_(select(SERVED.c.study_id).where(SERVED.c.modality.in_(query.modalities_in_study)))
        )
    return clauses


@dataclass(frozen=True)
class Page:
    """One page of results (DICOM JSON objects) and whether more match past it."""

    results: list[dict[str, Any]]
    more: bool


def search_studies(
    session: Session, query: QidoQuery, visibility: ColumnElement[bool], *, base_url: str = ""
) -> Page:
    """Studies matching ``query`` that ``visibility`` keeps, oldest first (stable paging).

    ``base_url`` (``.../dicomweb``) makes each result's RetrieveURL (0008,1190).
    """
    # Plain rows, not ORM objects: building 1000 Study objects cost more than the query itself.
    stmt = (
        select(*Study.__table__.columns).where(visibility, *_clauses(query, LEVEL_STUDY)).order_by(Study.id)
    )
    studies = _page(session, stmt, query)
    counts = _study_counts(session, [s.id for s in studies[: query.limit]])
    results = [
        study_json(s, *counts.get(s.id, ((), 0, 0)), base_url=base_url) for s in studies[: query.limit]
    ]
    return Page(results, len(studies) > len(results))


def search_series(
    session: Session,
    query: QidoQuery,
    visibility: ColumnElement[bool],
    *,
    study_uid: str | None = None,
    base_url: str = "",
) -> Page:
    """Series matching ``query`` (within ``study_uid`` when given), received ones first."""
    c = SERVED.c
    keys = (c.study_id, c.series_uid, c.modality, c.series_number, c.series_description, c.body_part)
    stmt = (
        select(*keys, func.count().label("instances"), Study)
        .join(Study, c.study_id == Study.id)
        .where(visibility, *_clauses(query, LEVEL_SERIES))
        .group_by(*keys, Study.id)
        .order_by(func.min(c.origin), func.min(c.row_id))
    )
    if study_uid is not None:
        stmt = stmt.where(Study.study_instance_uid == study_uid)
    rows = _page(session, stmt, query)
    shown = rows[: query.limit]
    results = []
    for row in shown:
        study = row[-1]
        data = series_json(row, study.study_instance_uid, row.instances, base_url=base_url)
        if study_uid is None or query.include_all:
            data.update(study_json(study, (), None, None))
        results.append(data)
    return Page(results, len(rows) > len(shown))


def search_instances(
    session: Session,
    query: QidoQuery,
    visibility: ColumnElement[bool],
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    base_url: str = "",
) -> Page:
    """Instances matching ``query`` (within the study / series when given), of every SOP
    class: received images first, then the objects this server made."""
    stmt = (
        select(SERVED, Study)
        .join(Study, SERVED.c.study_id == Study.id)
        .where(visibility, *_clauses(query, LEVEL_INSTANCE))
        .order_by(SERVED.c.origin, SERVED.c.row_id)
    )
    if study_uid is not None:
        stmt = stmt.where(Study.study_instance_uid == study_uid)
    if series_uid is not None:
        stmt = stmt.where(SERVED.c.series_uid == series_uid)
    rows = _page(session, stmt, query)
    shown = rows[: query.limit]
    results = []
    for row in shown:
        study = row[-1]
        data = instance_json(row, study.study_instance_uid, base_url=base_url)
        data.update(series_json(row, study.study_instance_uid, None))
        if study_uid is None or query.include_all:
            data.update(study_json(study, (), None, None))
        results.append(data)
    return Page(results, len(rows) > len(shown))


def _page(session: Session, stmt: Any, query: QidoQuery) -> list[Any]:
    """The page's rows plus one more, which tells whether more results exist."""
    stmt = stmt.offset(query.offset)
    if query.limit is not None:
        stmt = stmt.limit(query.limit + 1)
    rows = session.execute(stmt).all()
    return [row[0] if len(row) == 1 else row for row in rows]  # a lone entity, else the row


def _study_counts(session: Session, study_ids: Sequence[int]) -> dict[int, tuple[list[str], int, int]]:
    """study id -> (modalities, number of series, number of instances), made objects included."""
    if not study_ids:
        return {}
    c = SERVED.c
    where = c.study_id.in_(study_ids)
    totals = session.execute(
        select(c.study_id, func.count(distinct(c.series_uid)), func.count()).where(where).group_by(c.study_id)
    ).all()
    modalities: dict[int, list[str]] = {}
    for study_id, modality in session.execute(
        select(c.study_id, c.modality).where(where).distinct().order_by(c.study_id, c.modality)
    ).all():
        if modality:
            modalities.setdefault(study_id, []).append(modality)
    return {
        study_id: (modalities.get(study_id, []), series, instances) for study_id, series, instances in totals
    }


@lru_cache(maxsize=256)
def _tag_and_vr(keyword: str) -> tuple[str, str]:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return f"{tag:08X}", dictionary_VR(keyword)


NUMBER_VRS = {"IS", "US", "UL", "SS", "SL", "DS", "FL", "FD"}


def _json(values: dict[str, Any]) -> dict[str, Any]:
    """Keyword -> value (None or "": present, zero length) as the DICOM JSON model (PS3.18 F.2).

    Built directly (a QIDO-RS page of 1000 studies through pydicom Datasets took ~0.8 s);
    the unit tests check it equals ``Dataset.to_json_dict`` for the same values.
    """
    out: dict[str, Any] = {}
    for keyword, value in values.items():
        tag, vr = _tag_and_vr(keyword)
        if value is None or value == "" or value == []:
            out[tag] = {"vr": vr}
            continue
        items = value if isinstance(value, list) else [value]
        if vr == "PN":
            items = [{"Alphabetic": str(v)} for v in items]
        elif vr in NUMBER_VRS:
            items = [int(v) if vr in ("IS", "US", "UL", "SS", "SL") else float(v) for v in items]
        else:
            items = [str(v) for v in items]
        out[tag] = {"vr": vr, "Value": items}
    return dict(sorted(out.items()))


def study_json(
    study: Any,
    modalities: Sequence[str],
    series_count: int | None,
    instance_count: int | None,
    *,
    base_url: str = "",
) -> dict[str, Any]:
    """A study's attributes (PS3.18 Table 10.6.3-3) from a ``Study`` or a row of its columns; counts when given."""
    values: dict[str, Any] = {
        "SpecificCharacterSet": UTF8_CHARSET,
        "StudyDate": study.study_date,
        "StudyTime": study.study_time,
        "AccessionNumber": study.accession_number,
        "InstitutionName": study.institution_name,
        "ReferringPhysicianName": None,
        "StudyDescription": study.description,
        "PatientName": study.patient_name,
        "PatientID": study.patient_id,
        "PatientBirthDate": study.patient_birth_date,
        "PatientSex": study.patient_sex,
        "PatientAge": study.patient_age,
        "StudyInstanceUID": study.study_instance_uid,
        "StudyID": None,
    }
    if series_count is not None:
        values["ModalitiesInStudy"] = list(modalities)
        values["NumberOfStudyRelatedSeries"] = series_count
        values["NumberOfStudyRelatedInstances"] = instance_count or 0
    if base_url:
        values["RetrieveURL"] = f"{base_url}/studies/{study.study_instance_uid}"
    return _json(values)


def series_json(
    row: Any, study_uid: str, instance_count: int | None, *, base_url: str = ""
) -> dict[str, Any]:
    """A series' attributes (PS3.18 Table 10.6.3-4) from a row of ``SERVED``."""
    values: dict[str, Any] = {
        "SpecificCharacterSet": UTF8_CHARSET,
        "Modality": row.modality,
        "SeriesDescription": row.series_description,
        "BodyPartExamined": row.body_part,
        "SeriesInstanceUID": row.series_uid,
        "SeriesNumber": row.series_number or None,
    }
    if instance_count is not None:
        values["NumberOfSeriesRelatedInstances"] = instance_count
    if base_url:
        values["RetrieveURL"] = f"{base_url}/studies/{study_uid}/series/{row.series_uid}"
    return _json(values)


def instance_json(row: Any, study_uid: str, *, base_url: str = "") -> dict[str, Any]:
    """An instance's attributes (PS3.18 Table 10.6.3-5) from a row of ``SERVED``."""
    values: dict[str, Any] = {
        "SpecificCharacterSet": UTF8_CHARSET,
        "SOPClassUID": row.sop_class_uid,
        "SOPInstanceUID": row.sop_uid,
        "AvailableTransferSyntaxUID": row.transfer_syntax_uid or None,
        "InstanceNumber": row.instance_number or None,
        "ViewPosition": row.view_position,
        "Rows": row.rows,
        "Columns": row.columns,
    }
    if base_url:
        values["RetrieveURL"] = (
            f"{base_url}/studies/{study_uid}/series/{row.series_uid}/instances/{row.sop_uid}"
        )
    return _json(values)


def instance_files(
    session: Session,
    visibility: ColumnElement[bool],
    study_uid: str,
    series_uid: str | None = None,
    sop_uid: str | None = None,
) -> list[tuple[str, str, str, str]]:
    """(study, series, SOP instance UID, file path relative to the data directory) of the
    stored instances a WADO-RS retrieve names, made objects included, in filing order; empty
    when none is visible."""
    c = SERVED.c
    stmt = (
        select(Study.study_instance_uid, c.series_uid, c.sop_uid, c.file_path)
        .join(Study, c.study_id == Study.id)
        .where(visibility, Study.study_instance_uid == study_uid)
        .order_by(c.origin, c.row_id)
    )
    if series_uid is not None:
        stmt = stmt.where(c.series_uid == series_uid)
    if sop_uid is not None:
        stmt = stmt.where(c.sop_uid == sop_uid)
    return [tuple(row) for row in session.execute(stmt).all()]  # type: ignore[misc]


__all__ = [
    "LEVEL_INSTANCE",
    "LEVEL_SERIES",
    "LEVEL_STUDY",
    "Page",
    "QidoQuery",
    "QueryError",
    "instance_files",
    "parse_query",
    "search_instances",
    "search_series",
    "search_studies",
]
