"""Read-side views of studies, shared by the CLI (``studies list/show``) and the JSON API."""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Text, cast, exists, func, select
from sqlalchemy.orm import Session, selectinload

from xray_triage.store.dicom_meta import display_name
from xray_triage.store.reasons import image_label, user_reason
from xray_triage.store.schema import Instance, Series, Station, Study, TriageResult
from xray_triage.store.worklist_order import consult_columns, order_by, why


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def merge_findings(
    results: Iterable[tuple[list[str], dict[str, float], dict[str, float]]],
    urgent_labels: Collection[str] = (),
) -> list[dict[str, Any]]:
    """The study's flagged findings: why the AI called it what it did, highest probability first.

    ``results`` are (flagged labels, probabilities, thresholds) of the study's images; only
    labels at or above their threshold are listed (not the highest probabilities), each with
    its highest probability, the threshold it crossed and whether it is one of the model
    card's ``urgent_labels`` (the rule that makes a study urgent: ``triage/scoring.py``).
    """
    best: dict[str, tuple[float, float]] = {}
    for flagged, probabilities, thresholds in results:
        for label in flagged:
            p = float(probabilities.get(label, 0.0))
            if label not in best or p > best[label][0]:
                best[label] = (p, float(thresholds.get(label, 0.0)))
    return [
        {"label": k, "probability": p, "threshold": t, "urgent": k in urgent_labels}
        for k, (p, t) in sorted(best.items(), key=lambda kv: -kv[1][0])
    ]


def top_findings(study: Study, urgent_labels: Collection[str] = ()) -> list[dict[str, Any]]:
    """Flagged findings over the study's images (loaded with it), highest probability first."""
    return merge_findings(
        (
            (i.result.flagged, i.result.probabilities, i.result.thresholds)
            for s in study.series
            for i in s.instances
            if i.result is not None
        ),
        urgent_labels,
    )


@dataclass(frozen=True)
class RowExtras:
    """What a list row shows beyond the study's own columns."""

    findings: list[dict[str, Any]]
    instances: int


def row_extras(
    session: Session, study_ids: Sequence[int], urgent_labels: Collection[str] = ()
) -> dict[int, RowExtras]:
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
    results: dict[int, list[tuple[list[str], dict[str, float], dict[str, float]]]] = {}
    for study_id, flagged, probabilities, thresholds in session.execute(
        select(Series.study_id, TriageResult.flagged, TriageResult.probabilities, TriageResult.thresholds)
        .join(Instance, Instance.series_id == Series.id)
        .join(TriageResult, TriageResult.instance_id == Instance.id)
        .where(Series.study_id.in_(study_ids))
    ):
        results.setdefault(study_id, []).append((flagged, probabilities, thresholds))
    return {
        sid: RowExtras(merge_findings(results.get(sid, []), urgent_labels), n) for sid, n in counts.items()
    }


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
        .where(
            Series.study_id == Study.id, cast(TriageResult.flagged, Text).contains(needle, autoescape=True)
        )
    )


def study_summary(
    study: Study,
    station_names: dict[str, str],
    extras: RowExtras | None = None,
    consult: tuple[str | None, str | None] = (None, None),
    urgent_labels: Collection[str] = (),
) -> dict[str, Any]:
    """The study's list entry; ``extras`` (from ``row_extras``) saves loading its images and results.

    ``consult`` is the (status, urgency) of the study's newest consult; ``why`` is the study's
    tier in the worklist order (``worklist_order.TIERS``).
    """
    if extras is None:
        extras = RowExtras(top_findings(study, urgent_labels), sum(len(s.instances) for s in study.series))
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
        "consult_status": consult[0],
        "consult_urgency": consult[1],
        "why": why(study.priority, consult[0], consult[1]),
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
    session: Session,
    *,
    limit: int = 200,
    offset: int = 0,
    where: ColumnElement[bool] | None = None,
    urgent_labels: Collection[str] = (),
) -> list[dict[str, Any]]:
    """Studies in the worklist order (``worklist_order``); ``where`` narrows them (e.g. to one station's).

    Loads the page's studies and only their row extras (findings, image counts).
    """
    status, urgency = consult_columns()
    query = select(Study, status.label("consult_status"), urgency.label("consult_urgency"))
    if where is not None:
        query = query.where(where)
    found = session.execute(query.order_by(*order_by(status, urgency)).limit(limit).offset(offset)).all()
    names = station_names(session)
    extras = row_extras(session, [s.id for s, _, _ in found], urgent_labels)
    return [
        study_summary(s, names, extras.get(s.id, RowExtras([], 0)), (st, urg), urgent_labels)
        for s, st, urg in found
    ]


def count_studies(session: Session, where: ColumnElement[bool] | None = None) -> int:
    query = select(func.count(Study.id))
    return session.scalar(query if where is None else query.where(where)) or 0


def get_study(session: Session, study_uid: str, urgent_labels: Collection[str] = ()) -> dict[str, Any] | None:
    study = session.scalar(_load_studies().where(Study.study_instance_uid == study_uid))
    if study is None:
        return None
    status, urgency = consult_columns()
    consult = session.execute(select(status, urgency).where(Study.id == study.id)).one()
    detail = study_summary(
        study, station_names(session), consult=(consult[0], consult[1]), urgent_labels=urgent_labels
    )
    detail["images"] = [_instance_detail(i, s) for s in study.series for i in s.instances]
    return detail
