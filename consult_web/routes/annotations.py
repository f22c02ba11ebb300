"""Marks on study images (JSON API): list, create, edit and delete.

The rules are core's: where a mark may be (``xray_triage/consults/geometry.py``:
shape per kind, finite numbers, on the image with a small margin; refused with 422)
and who may mark and change what (``xray_triage/consults/annotations.py``, which
raises ``AnnotationRuleError``; the app answers it as a localized HTTP error). This
module adds the request bodies, the 404s for what a user may not see and the audit
trail. Every change is audited in the same transaction, which is also how the live-update stream
learns that other browsers should reload the marks.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy.orm import Session

from consult_web import schemas
from consult_web.access import visible_instance, visible_study
from consult_web.audit import audit
from consult_web.deps import CurrentUser, Db, ReadSession
from consult_web.permissions import can_see
from xray_triage.consults.annotations import (
    DEFAULT_COLOR,
    annotations_of,
    check_author,
    check_label,
    check_may_annotate,
    record_change,
    serialize,
    text_label_ok,
)
from xray_triage.consults.geometry import Kind, Shape, check_bounds, geometry_json, parse_geometry
from xray_triage.store.consult_schema import Annotation
from xray_triage.store.schema import Instance, Study, utcnow
from xray_triage.store.users import AuthUser

log = logging.getLogger(__name__)
api_router = APIRouter(prefix="/api", tags=["annotations"])

MAX_LABEL = 500
COLOR_PATTERN = r"^#[0-9a-fA-F]{6}$"


def _check_label(label: str) -> str:
    if "\x00" in label:
        raise ValueError("label must not contain NUL characters")
    return label


class AnnotationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instance_uid: str = Field(min_length=1, max_length=64)
    kind: Kind
    geometry: dict[str, Any]
    label: str = Field("", max_length=MAX_LABEL)
    color: str = Field(DEFAULT_COLOR, pattern=COLOR_PATTERN)

    @field_validator("label")
    @classmethod
    def _label_ok(cls, value: str) -> str:
        return _check_label(value)

    @model_validator(mode="after")
    def _shape_fits_kind(self) -> AnnotationCreate:
        self.geometry = geometry_json(parse_geometry(self.kind, self.geometry))
        if not text_label_ok(self.kind, self.label):
            raise ValueError("a text mark needs a non-empty label")
        return self


class AnnotationUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str | None = Field(None, max_length=MAX_LABEL)
    geometry: dict[str, Any] | None = None
    color: str | None = Field(None, pattern=COLOR_PATTERN)

    @field_validator("label")
    @classmethod
    def _label_ok(cls, value: str | None) -> str | None:
        return value if value is None else _check_label(value)

    @model_validator(mode="after")
    def _something(self) -> AnnotationUpdate:
        if self.label is None and self.geometry is None and self.color is None:
            raise ValueError("nothing to change: give label, geometry or color")
        return self


def _on_image(shape: Shape, instance: Instance) -> None:
    """422 unless every point of the shape lies on the image (the detail names the point)."""
    try:
        check_bounds(shape, instance)
    except ValueError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None


def _own_annotation(session: Session, user: AuthUser, annotation_id: int) -> tuple[Annotation, Study, Instance]:
    """The annotation if the user may see it (else 404) and wrote it (else 403)."""
    annotation = session.get(Annotation, annotation_id)
    study = session.get(Study, annotation.study_id) if annotation is not None else None
    if annotation is None or study is None or not can_see(user, study):
        raise HTTPException(status_code=404, detail="annotation not found")
    check_author(user, annotation)
    instance = session.get(Instance, annotation.instance_id)
    if instance is None:
        raise HTTPException(status_code=404, detail="annotation not found")
    return annotation, study, instance


@api_router.get("/studies/{study_uid}/annotations", response_model=schemas.AnnotationList)
def list_annotations(study_uid: str, user: CurrentUser, session: ReadSession) -> dict[str, Any]:
    """Every mark on the study's images, oldest first."""
    study = visible_study(session, user, study_uid)
    return {"annotations": annotations_of(session, study, user)}


@api_router.post("/studies/{study_uid}/annotations", status_code=201, response_model=schemas.Annotation)
def create_annotation(
    request: Request, study_uid: str, body: AnnotationCreate, user: CurrentUser, db: Db
) -> dict[str, Any]:
    """Mark an image of the study (the user must be allowed to annotate it)."""
    with db.session() as session:
        study, instance = visible_instance(session, user, study_uid, body.instance_uid)
        check_may_annotate(user, study)
        _on_image(parse_geometry(body.kind, body.geometry), instance)
        now = utcnow()
        annotation = Annotation(
            created_at=now,
            updated_at=now,
            instance_id=instance.id,
            study_id=study.id,
            author_id=user.id,
            kind=body.kind,
            geometry=body.geometry,
            label=body.label,
            color=body.color.lower(),
        )
        session.add(annotation)
        session.flush()
        audit(
            session, user, "annotation.create", study_uid=study_uid, request=request,
            annotation_id=annotation.id, kind=body.kind,
        )  # fmt: skip
        record_change(session, study, annotation, "create")
        session.flush()
        return serialize(annotation, instance.sop_instance_uid, user)


@api_router.patch("/annotations/{annotation_id}", response_model=schemas.Annotation)
def update_annotation(
    request: Request, annotation_id: int, body: AnnotationUpdate, user: CurrentUser, db: Db
) -> dict[str, Any]:
    """Change one's own mark: its label, geometry or color."""
    with db.session() as session:
        annotation, study, instance = _own_annotation(session, user, annotation_id)
        if body.geometry is not None:
            try:
                shape = parse_geometry(annotation.kind, body.geometry)
            except ValueError as exc:
                raise HTTPException(status_code=422, detail=str(exc)) from None
            _on_image(shape, instance)
            annotation.geometry = geometry_json(shape)
        if body.label is not None:
            check_label(annotation.kind, body.label)
            annotation.label = body.label
        if body.color is not None:
            annotation.color = body.color.lower()
        annotation.updated_at = utcnow()
        changed = sorted(k for k in ("label", "geometry", "color") if getattr(body, k) is not None)
        audit(
            session, user, "annotation.update", study_uid=study.study_instance_uid, request=request,
            annotation_id=annotation.id, changed=changed,
        )  # fmt: skip
        record_change(session, study, annotation, "update")
        session.flush()
        return serialize(annotation, instance.sop_instance_uid, user)


@api_router.delete("/annotations/{annotation_id}", status_code=204, response_class=Response)
def delete_annotation(request: Request, annotation_id: int, user: CurrentUser, db: Db) -> Response:
    """Delete one's own mark."""
    with db.session() as session:
        annotation, study, _instance = _own_annotation(session, user, annotation_id)
        audit(
            session, user, "annotation.delete", study_uid=study.study_instance_uid, request=request,
            annotation_id=annotation.id, kind=annotation.kind,
        )  # fmt: skip
        record_change(session, study, annotation, "delete")
        session.delete(annotation)
    return Response(status_code=204)
