"""The JSON API's response shapes, as pydantic models (``response_model`` of each API route).

They are what ``/api/openapi.json`` describes, so API clients can be generated. The data
itself is built where it always was (``xray_triage.store.queries`` for studies,
``xray_triage.consults.annotations.serialize`` for marks, ``pipeline.render.windows_info``
for windows) and validated here on the way out; consults are read from their ORM rows
(``Consult.from_row``). Every model forbids unknown keys: a key added at the source but
not here fails the API's tests instead of silently disappearing from the answer.
Timestamps are ISO 8601 strings as the sources write them (UTC, with offset).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from xray_triage.consults.geometry import Kind
from xray_triage.store import consult_schema


class ApiModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Finding(ApiModel):
    """A flagged label: its highest probability over the study's images, the threshold it
    crossed there, and whether it is one of the model card's urgent labels."""

    label: str
    probability: float
    threshold: float
    urgent: bool


class StationRef(ApiModel):
    ae_title: str
    name: str


class StudySummary(ApiModel):
    """A study as ``/api/studies`` lists it (``xray_triage.store.queries.study_summary``)."""

    study_uid: str
    patient_id: str
    patient_name: str
    patient_name_dicom: str
    patient_sex: str
    patient_age: str
    patient_birth_date: str
    study_date: str
    accession_number: str
    description: str
    institution: str
    station: StationRef
    received_at: str | None
    updated_at: str | None
    ai_status: str
    priority: str | None
    findings: list[Finding]
    instances: int
    consult_status: str | None
    consult_urgency: str | None
    why: str  # tier in the worklist order: xray_triage.store.worklist_order.TIERS


class StudyPage(ApiModel):
    """One page of ``/api/studies``: fetch again with ``offset=next_offset`` until it is null."""

    studies: list[StudySummary]
    total: int
    limit: int
    offset: int
    next_offset: int | None
    disclaimer: str


class TriageResult(ApiModel):
    model_version: str
    probabilities: dict[str, float]
    thresholds: dict[str, float]
    flagged: list[str]
    abnormal_score: float
    priority: str
    timings_ms: dict[str, float | None]
    heatmaps: dict[str, Any]
    created_at: str | None


class InstanceDetail(ApiModel):
    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    modality: str
    body_part: str
    view_position: str
    rows: int | None
    columns: int | None
    transfer_syntax_uid: str
    file_path: str
    file_size: int
    calling_ae: str
    received_at: str | None
    ai_status: str
    ai_error: str | None
    result: TriageResult | None


class StudyDetail(StudySummary):
    """``/api/studies/{study_uid}`` (``queries.get_study``): the summary, every image, the disclaimer."""

    images: list[InstanceDetail]
    disclaimer: str


class ConsultMessage(ApiModel):
    author: str
    body: str
    created_at: str


class Consult(ApiModel):
    id: int
    status: str
    urgency: str
    question: str
    conclusion: str | None
    requested_by: str
    claimed_by: str | None
    created_at: str
    updated_at: str
    messages: list[ConsultMessage]

    @classmethod
    def from_row(cls, consult: consult_schema.Consult) -> Consult:
        """The consult and its messages (loaded with it), names as user names."""
        return cls(
            id=consult.id,
            status=consult.status,
            urgency=consult.urgency,
            question=consult.question,
            conclusion=consult.conclusion,
            requested_by=consult.requested_by.username,
            claimed_by=consult.claimed_by.username if consult.claimed_by else None,
            created_at=consult.created_at.isoformat(),
            updated_at=consult.updated_at.isoformat(),
            messages=[
                ConsultMessage(author=m.author.username, body=m.body, created_at=m.created_at.isoformat())
                for m in consult.messages
            ],
        )


class ConsultList(ApiModel):
    consults: list[Consult]


class Annotation(ApiModel):
    """One mark (``xray_triage.consults.annotations.serialize``); ``can_edit`` is for the caller."""

    id: int
    instance_uid: str
    kind: Kind
    geometry: dict[str, Any]
    label: str
    color: str
    author: str
    author_id: int | None
    created_at: str | None
    updated_at: str | None
    can_edit: bool


class AnnotationList(ApiModel):
    annotations: list[Annotation]


class WindowValues(ApiModel):
    """A window in Modality-LUT units: centre and width."""

    wc: float
    ww: float


class ImageWindows(ApiModel):
    """``pipeline.render.windows_info``: the image's size, VOI source and window presets."""

    rows: int
    columns: int
    photometric: str
    inverted: bool
    value_range: tuple[float, float]
    dicom_voi: str
    presets: dict[str, WindowValues]


class ApiError(BaseModel):
    """Every error answer of the API (``consult_web.app``'s handlers): ``detail`` in English for
    programs; ``message`` in the user's language where the error has one; ``reference`` (500
    only) names the server's log line."""

    detail: str
    message: str | None = None
    reference: str | None = None


# The error answers documented on every API route (the 422 replaces FastAPI's default, whose
# ``detail`` is a list: this app answers invalid requests with one readable string).
API_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ApiError, "description": "Not logged in (no or an invalid session or token)"},
    403: {"model": ApiError, "description": "Not allowed to the user (role, author, CSRF)"},
    404: {"model": ApiError, "description": "No such study, image or mark, or one the user may not see"},
    422: {"model": ApiError, "description": "Invalid request: which parameter and why"},
}
