"""Read-side views of studies, shared by the CLI (``studies list/show``) and the JSON API."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Text, cast, exists, func, select
from sqlalchemy.orm import Session, selectinload

from xray_triage.store.dicom_meta import display_name
from xray_triage.store.reasons import image_label, user_reason
from xray_triage.store.schema import Instance, Series, Station, Study, TriageResult


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def merge_findings(results: Iterable[tuple[list[str], dict[str, float]]]) -> list[dict[str, Any]]:
    """Flagged findings over (flagged labels, probabilities) of a study's results, highest first."""
    best: dict[str, float] = {}
    for flagged, probabilities in results:
        for label in flagged:
            p = float(probabilities.get(label, 0.0))
            best[label] = max(best.get(label, 0.0), p)
    return [{"label": k, "probability": v} for k, v in sorted(best.items(), key=lambda kv: -kv[1])]


def top_findings(study: Study) -> list[dict[str, Any]]:
    """Flagged findings over the study's images (loaded with it), highest probability first."""
    return merge_findings(
        (i.result.flagged, i.result.probabilities) for s in study.series for i in s.instances if i.result is not None
    )


@dataclass(frozen=True)
class RowExtras:
    """What a list row shows beyond the study's own columns."""

    findings: list[dict[str, Any]]
    instances: int


def row_extras(session: Session, study_ids: Sequence[int]) -> dict[int, RowExtras]:
    """Findings and image counts of these studies, in two small queries.

    A list page loads only this, not the studies' series, instances and whole results
    (heatmaps, thresholds, timings): the worklist's 500 rows with their results took
    336 ms that way. Returns study id -> extras (studies without images are absent).
    """
    if not study_ids:
        return {}
    counts = dict(
        session.execute(
            select(Series.study_id, func.count(Instance.id))
            .join(Instance, Instance.series_id == Series.id)
            .where(Series.study_id.in_(study_ids))
            .group_by(Series.study_id)
        ).all()
    )
    results: dict[int, list[tuple[list[str], dict[str, float]]]] = {}
    for study_id, flagged, probabilities in session.execute(
        select(Series.study_id, TriageResult.flagged, TriageResult.probabilities)
        .join(Instance, Instance.series_id == Series.id)
        .join(TriageResult, TriageResult.instance_id == Instance.id)
        .where(Series.study_id.in_(study_ids))
    ):
        results.setdefault(study_id, []).append((flagged, probabilities))
    return {sid: RowExtras(merge_findings(results.get(sid, [])), n) for sid, n in counts.items()}


def flagged_clause(label: str) -> ColumnElement[bool]:
    """Studies with an image whose result flags ``label``, in SQL (so a filtered list can be paged).

    The flagged labels are a JSON list; its text holds the label as ``json.dumps`` writes it,
    quotes included, so "Effusion" does not match "Pleural Effusion". Portable SQL (CAST and
    LIKE with escaped wildcards), no database-specific JSON functions.
    """
    needle = json.dumps(label)
    return exists(
        select(TriageResult.id)
        .join(Instance, TriageResult.instance_id == Instance.id)
        .join(Series, Instance.series_id == Series.id)
        .where(Series.study_id == Study.id, cast(TriageResult.flagged, Text).contains(needle, autoescape=True))
    )


def study_summary(study: Study, station_names: dict[str, str], extras: RowExtras | None = None) -> dict[str, Any]:
    """The study's list entry; ``extras`` (from ``row_extras``) saves loading its images and results."""
    if extras is None:
        extras = RowExtras(top_findings(study), sum(len(s.instances) for s in study.series))
    return {
        "study_uid": study.study_instance_uid,
        "patient_id": study.patient_id,
        "patient_name": display_name(study.patient_name),
        "patient_name_dicom": study.patient_name,
        "patient_sex": study.patient_sex,
        "patient_age": study.patient_age,
        "patient_birth_date": study.patient_birth_date,
        "study_date": study.study_date,
        "accession_number": study.accession_number,
        "description": study.description,
        "institution": study.institution_name,
        "station": {"ae_title": study.station_ae, "name": station_names.get(study.station_ae, "")},
        "received_at": _iso(study.received_at),
        "updated_at": _iso(study.updated_at),
        "ai_status": study.ai_status,
        "priority": study.priority,
        "findings": extras.findings,
        "instances": extras.instances,
    }


def _instance_detail(instance: Instance, series: Series) -> dict[str, Any]:
    result = instance.result
    return {
        "sop_instance_uid": instance.sop_instance_uid,
        "sop_class_uid": instance.sop_class_uid,
        "series_uid": series.series_instance_uid,
        "modality": series.modality,
        "body_part": series.body_part,
        "view_position": instance.view_position,
        "rows": instance.rows,
        "columns": instance.columns,
        "transfer_syntax_uid": instance.transfer_syntax_uid,
        "file_path": instance.file_path,
        "file_size": instance.file_size,
        "calling_ae": instance.calling_ae,
        "received_at": _iso(instance.received_at),
        "ai_status": instance.ai_status,
        "ai_error": instance_reason(instance),
        "result": None
        if result is None
        else {
            "model_version": result.model_version,
            "probabilities": result.probabilities,
            "thresholds": result.thresholds,
            "flagged": result.flagged,
            "abnormal_score": result.abnormal_score,
            "priority": result.priority,
            "timings_ms": result.timings_ms,
            "heatmaps": result.heatmaps,
            "created_at": _iso(result.created_at),
        },
    }


def instance_reason(instance: Instance) -> str | None:
    """The instance's failure reason as users may see it (rows of older versions named the file)."""
    return user_reason(
        instance.ai_error, file_path=instance.file_path, label=image_label(instance.sop_instance_uid)
    )


def _load_studies():  # type: ignore[no-untyped-def]
    return select(Study).options(
        selectinload(Study.series).selectinload(Series.instances).selectinload(Instance.result)
    )


def station_names(session: Session) -> dict[str, str]:
    """AE title -> the station's human name."""
    return {s.ae_title: s.name for s in session.scalars(select(Station))}


def list_studies(
    session: Session, *, limit: int = 200, offset: int = 0, where: ColumnElement[bool] | None = None
) -> list[dict[str, Any]]:
    """Most urgent first, then newest; ``where`` narrows the studies (e.g. to one station's).

    Loads the page's studies and only their row extras (findings, image counts).
    """
    query = select(Study) if where is None else select(Study).where(where)
    studies = session.scalars(
        query.order_by(Study.priority_rank.desc(), Study.received_at.desc(), Study.id.desc())
        .limit(limit)
        .offset(offset)
    ).all()
    names = station_names(session)
    extras = row_extras(session, [s.id for s in studies])
    return [study_summary(s, names, extras.get(s.id, RowExtras([], 0))) for s in studies]


def count_studies(session: Session, where: ColumnElement[bool] | None = None) -> int:
    query = select(func.count(Study.id))
    return session.scalar(query if where is None else query.where(where)) or 0


def get_study(session: Session, study_uid: str) -> dict[str, Any] | None:
    study = session.scalar(_load_studies().where(Study.study_instance_uid == study_uid))
    if study is None:
        return None
    detail = study_summary(study, station_names(session))
    detail["images"] = [_instance_detail(i, s) for s in study.series for i in s.instances]
    return detail
