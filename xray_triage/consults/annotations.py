"""Who may mark a study's images, who may change a mark, and how marks are listed.

Everyone who may see the study sees every mark; specialists (and admins, who act as
specialists) may mark any study, station doctors their own station's; only a mark's
author may change or delete it. The web app's annotation API and the study viewer
both build on these; refusals raise ``AnnotationRuleError``. Whoever creates, edits or
deletes a mark calls ``record_change`` in that transaction (the ``AnnotationChanged`` event).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from xray_triage.consults.errors import AnnotationRuleError
from xray_triage.consults.visibility import can_see
from xray_triage.events import AnnotationChange, AnnotationChanged
from xray_triage.store import outbox
from xray_triage.store.consult_schema import ROLE_ADMIN, ROLE_SPECIALIST, ROLE_STATION, Annotation
from xray_triage.store.schema import Instance, Study
from xray_triage.store.users import AuthUser

DEFAULT_COLOR = "#ffd400"


def can_annotate(user: AuthUser, study: Study) -> bool:
    """Specialists (and admins, who act as specialists) anywhere; station doctors on their own studies."""
    if user.role in (ROLE_SPECIALIST, ROLE_ADMIN):
        return True
    return user.role == ROLE_STATION and can_see(user, study)


def check_may_annotate(user: AuthUser, study: Study) -> None:
    """AnnotationRuleError("annotation_forbidden") unless ``user`` may add marks to ``study``."""
    if not can_annotate(user, study):
        raise AnnotationRuleError("annotation_forbidden")


def check_author(user: AuthUser, annotation: Annotation) -> None:
    """AnnotationRuleError("annotation_not_author") unless ``user`` wrote the mark."""
    if annotation.author_id != user.id:
        raise AnnotationRuleError("annotation_not_author")


def text_label_ok(kind: str, label: str) -> bool:
    """A text mark is nothing but its label, so it must not be blank."""
    return kind != "text" or bool(label.strip())


def check_label(kind: str, label: str) -> None:
    """AnnotationRuleError("text_mark_label") for a blank label on a text mark."""
    if not text_label_ok(kind, label):
        raise AnnotationRuleError("text_mark_label")


def record_change(session: Session, study: Study, annotation: Annotation, change: AnnotationChange) -> None:
    """Record that ``annotation`` (flushed: it has an id) on ``study`` was created, updated or deleted."""
    outbox.record(
        session, AnnotationChanged(study.study_instance_uid, study.station_ae, annotation.id, change)
    )


def serialize(annotation: Annotation, instance_uid: str, user: AuthUser) -> dict[str, Any]:
    """One mark as the API and the viewer show it; ``can_edit`` is for ``user``."""
    author = annotation.author
    return {
        "id": annotation.id,
        "instance_uid": instance_uid,
        "kind": annotation.kind,
        "geometry": annotation.geometry,
        "label": annotation.label or "",
        "color": annotation.color or DEFAULT_COLOR,
        "author": (author.display_name or author.username) if author else "",
        "author_id": annotation.author_id,
        "created_at": annotation.created_at.isoformat() if annotation.created_at else None,
        "updated_at": annotation.updated_at.isoformat() if annotation.updated_at else None,
        "can_edit": annotation.author_id == user.id,
    }


def annotations_of(session: Session, study: Study, user: AuthUser) -> list[dict[str, Any]]:
    """Every mark on the study's images, oldest first (the viewer draws newer marks on top)."""
    rows = session.execute(
        select(Annotation, Instance.sop_instance_uid)
        .join(Instance, Annotation.instance_id == Instance.id)
        .where(Annotation.study_id == study.id)
        .options(selectinload(Annotation.author))
        .order_by(Annotation.id)
    ).all()
    return [serialize(annotation, sop_uid, user) for annotation, sop_uid in rows]
