"""DICOM objects this server made (AI SR and GSPS, specialist GSPS, consult SR), filed in their study.

A separate table, not rows of ``instances``: a result object is never triaged, never listed
as an image (worklist thumbnails, viewer, image counts) and never changes a study's AI status
or priority, and no existing query can pick one up by accident. Its file lies where a received
instance's would (``dicom/<study>/<series>/<sop>.dcm``, written by ``files.write_durably``), so
whoever serves or sends instances from the store (DICOMweb, exporters) reads this table too.

Versions: ``source_key`` names what an object is made from (e.g. ``ai-sr:<SOP Instance UID>``,
``consult-sr:<consult id>``); ``version`` counts from 1 per key, and ``content_sha256`` (of the
inputs, not of the file) says whether a new build would differ. Building the same input
again finds the latest version's hash equal and files nothing (idempotent); a changed input
files version n+1 with a new SOP Instance UID.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Integer, String, Text, UniqueConstraint, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from xray_triage.store.schema import Base, UTCDateTime, utcnow

CATEGORY_AI = "ai-results"
CATEGORY_CONSULT = "consult-results"


class ResultObject(Base):
    __tablename__ = "result_objects"
    __table_args__ = (UniqueConstraint("source_key", "version", name="uq_result_objects_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), nullable=False, index=True)
    # The image it is about (AI results, marks); NULL for a study-level object (consult SR).
    source_instance_id: Mapped[int | None] = mapped_column(ForeignKey("instances.id"), nullable=True)
    kind: Mapped[str] = mapped_column(
        String(32), nullable=False
    )  # ai-sr, ai-gsps, annotation-gsps, consult-sr
    category: Mapped[str] = mapped_column(String(32), nullable=False)  # CATEGORY_AI / CATEGORY_CONSULT
    source_key: Mapped[str] = mapped_column(String(128), nullable=False, index=True)
    version: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    content_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    sop_class_uid: Mapped[str] = mapped_column(String(64), nullable=False)
    series_instance_uid: Mapped[str] = mapped_column(String(64), nullable=False)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64), nullable=False)
    file_path: Mapped[str] = mapped_column(Text, nullable=False)  # relative to the data directory
    file_size: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


def latest_version(session: Session, source_key: str) -> ResultObject | None:
    """The newest object filed for ``source_key`` (None: none yet)."""
    return session.scalar(
        select(ResultObject)
        .where(ResultObject.source_key == source_key)
        .order_by(ResultObject.version.desc())
        .limit(1)
    )


def result_objects_of(session: Session, study_id: int) -> list[ResultObject]:
    """Every object filed in the study, oldest first (for DICOMweb, exporters and tests)."""
    return list(
        session.scalars(
            select(ResultObject).where(ResultObject.study_id == study_id).order_by(ResultObject.id)
        )
    )


def find_result_object(session: Session, sop_instance_uid: str) -> ResultObject | None:
    """The object with this SOP Instance UID (DICOMweb/WADO and exporters serve it from ``file_path``)."""
    return session.scalar(select(ResultObject).where(ResultObject.sop_instance_uid == sop_instance_uid))
