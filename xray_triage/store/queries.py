"""Read-side views of studies, shared by the CLI (``studies list/show``) and the JSON API."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session, selectinload

from xray_triage.store.dicom_meta import display_name
from xray_triage.store.reasons import image_label, user_reason
from xray_triage.store.schema import Instance, Series, Station, Study


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def top_findings(study: Study) -> list[dict[str, Any]]:
    """Flagged findings over the study's images, highest probability first."""
    best: dict[str, float] = {}
    for series in study.series:
        for instance in series.instances:
            if instance.result is None:
                continue
            for label in instance.result.flagged:
                p = float(instance.result.probabilities.get(label, 0.0))
                best[label] = max(best.get(label, 0.0), p)
    return [{"label": k, "probability": v} for k, v in sorted(best.items(), key=lambda kv: -kv[1])]


def study_summary(study: Study, station_names: dict[str, str]) -> dict[str, Any]:
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
        "findings": top_findings(study),
        "instances": sum(len(s.instances) for s in study.series),
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
    """Most urgent first, then newest; ``where`` narrows the studies (e.g. to one station's)."""
    query = _load_studies() if where is None else _load_studies().where(where)
    studies = session.scalars(
        query.order_by(Study.priority_rank.desc(), Study.received_at.desc(), Study.id.desc())
        .limit(limit)
        .offset(offset)
    ).all()
    names = station_names(session)
    return [study_summary(s, names) for s in studies]


def get_study(session: Session, study_uid: str) -> dict[str, Any] | None:
    study = session.scalar(_load_studies().where(Study.study_instance_uid == study_uid))
    if study is None:
        return None
    detail = study_summary(study, station_names(session))
    detail["images"] = [_instance_detail(i, s) for s in study.series for i in s.instances]
    return detail
