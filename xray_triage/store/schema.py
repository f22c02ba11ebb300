"""SQLAlchemy 2 models: stations, studies, series, instances, triage jobs and results.

Only portable column types and constraints are used (no SQLite-only SQL), so the
same schema runs on PostgreSQL by changing ``database_url``.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# The triage priority is stored as one of these words (re-exported for the store's readers).
from xray_triage.priority import PRIORITY_ABNORMAL as PRIORITY_ABNORMAL
from xray_triage.priority import PRIORITY_NORMAL as PRIORITY_NORMAL
from xray_triage.priority import PRIORITY_RANK as PRIORITY_RANK
from xray_triage.priority import PRIORITY_URGENT as PRIORITY_URGENT

# AI status of an instance or study, as stored strings.
AI_PENDING = "pending"
AI_DONE = "done"
AI_FAILED = "failed"
AI_NOT_APPLICABLE = "not_applicable"

JOB_QUEUED = "queued"
JOB_RUNNING = "running"
JOB_DONE = "done"
JOB_FAILED = "failed"


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """Timestamps stored in UTC and always read back timezone-aware.

    SQLite keeps no time zone, so without this a value read back would be naive
    and an API client could not tell UTC from local time.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(UTC)
        return value

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    pass


class Station(Base):
    """A modality (X-ray machine) allowed to send, identified by its calling AE title."""

    __tablename__ = "stations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ae_title: Mapped[str] = mapped_column(String(16), unique=True, nullable=False)
    name: Mapped[str] = mapped_column(String(200), nullable=False, default="")
    allowed_ips: Mapped[str | None] = mapped_column(Text, nullable=True)  # comma-separated; NULL = any
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    # Indexed (like the other QIDO-RS match keys below): DICOMweb searches by them.
    patient_id: Mapped[str] = mapped_column(String(64), default="", index=True)
    patient_name: Mapped[str] = mapped_column(String(324), default="", index=True)
    patient_sex: Mapped[str] = mapped_column(String(16), default="")
    patient_birth_date: Mapped[str] = mapped_column(String(8), default="")
    patient_age: Mapped[str] = mapped_column(String(4), default="")
    study_date: Mapped[str] = mapped_column(String(8), default="", index=True)
    study_time: Mapped[str] = mapped_column(String(16), default="")
    accession_number: Mapped[str] = mapped_column(String(16), default="", index=True)
    description: Mapped[str] = mapped_column(String(64), default="")
    institution_name: Mapped[str] = mapped_column(String(64), default="")
    station_ae: Mapped[str] = mapped_column(String(16), default="", index=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    # Indexed: the web view's live-update streams ask "what changed since" every second.
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    # Summaries of the instances, kept up to date in the same transactions that change them.
    ai_status: Mapped[str] = mapped_column(String(16), default=AI_PENDING, index=True)
    priority: Mapped[str | None] = mapped_column(String(16), nullable=True, index=True)
    priority_rank: Mapped[int] = mapped_column(Integer, default=0, index=True)

    series: Mapped[list[Series]] = relationship(back_populates="study", order_by="Series.id")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), nullable=False, index=True)
    modality: Mapped[str] = mapped_column(String(16), default="", index=True)  # QIDO ModalitiesInStudy
    body_part: Mapped[str] = mapped_column(String(64), default="")
    series_number: Mapped[str] = mapped_column(String(12), default="")
    description: Mapped[str] = mapped_column(String(64), default="")

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series", order_by="Instance.id")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    sop_class_uid: Mapped[str] = mapped_column(String(64), nullable=False)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), nullable=False, index=True)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64), default="")
    instance_number: Mapped[str] = mapped_column(String(12), default="")
    view_position: Mapped[str] = mapped_column(String(16), default="")
    rows: Mapped[int | None] = mapped_column(Integer, nullable=True)
    columns: Mapped[int | None] = mapped_column(Integer, nullable=True)
    file_path: Mapped[str] = mapped_column(Text, nullable=False)  # relative to the data directory
    file_size: Mapped[int] = mapped_column(Integer, default=0)
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    peer_address: Mapped[str] = mapped_column(String(64), default="")
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    receive_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    store_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    ai_status: Mapped[str] = mapped_column(String(16), default=AI_PENDING, index=True)
    ai_error: Mapped[str | None] = mapped_column(Text, nullable=True)

    series: Mapped[Series] = relationship(back_populates="instances")
    result: Mapped[TriageResult | None] = relationship(back_populates="instance", uselist=False)


class TriageJob(Base):
    """The durable queue: one row per instance to triage; survives a crash."""

    __tablename__ = "triage_jobs"
    __table_args__ = (UniqueConstraint("instance_id", name="uq_triage_jobs_instance"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), nullable=False)
    state: Mapped[str] = mapped_column(String(16), default=JOB_QUEUED, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    worker: Mapped[str | None] = mapped_column(String(64), nullable=True)  # "host:pid/n" of the claimant
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # While ``running``: the claim holds until this time, renewed by its live worker; after it,
    # any worker may take the job over (migration 0002).
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True, index=True)


class TriageResult(Base):
    """Exactly one per triaged instance (unique on instance_id)."""

    __tablename__ = "triage_results"
    __table_args__ = (UniqueConstraint("instance_id", name="uq_triage_results_instance"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), nullable=False)
    model_version: Mapped[str] = mapped_column(String(128), nullable=False)
    probabilities: Mapped[dict] = mapped_column(JSON, nullable=False)
    thresholds: Mapped[dict] = mapped_column(JSON, nullable=False)
    flagged: Mapped[list] = mapped_column(JSON, nullable=False)
    abnormal_score: Mapped[float] = mapped_column(Float, nullable=False)
    priority: Mapped[str] = mapped_column(String(16), nullable=False)
    timings_ms: Mapped[dict] = mapped_column(JSON, nullable=False)
    # flagged label -> {"grid": [[0..1]], "box": [top, left, height, width] in source pixels}
    heatmaps: Mapped[dict] = mapped_column(JSON, nullable=False, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    instance: Mapped[Instance] = relationship(back_populates="result")


# Why an instance was quarantined instead of filed into a study.
QUARANTINE_SOP_CONFLICT = "sop_instance_conflict"  # same SOP Instance UID, other content or other station
QUARANTINE_STUDY_OTHER_STATION = (
    "study_of_other_station"  # Study Instance UID already used by another station
)
QUARANTINE_SERIES_OTHER_STATION = (
    "series_of_other_station"  # Series Instance UID already used by another station
)
QUARANTINE_SERIES_OTHER_STUDY = (
    "series_of_other_study"  # Series Instance UID already filed under another study
)
QUARANTINE_REASONS = (
    QUARANTINE_SOP_CONFLICT,
    QUARANTINE_STUDY_OTHER_STATION,
    QUARANTINE_SERIES_OTHER_STATION,
    QUARANTINE_SERIES_OTHER_STUDY,
)


class QuarantinedInstance(Base):
    """An acknowledged instance kept apart: stored and recorded, in no study, never triaged.

    A separate table (not a flag on ``instances``) so that no study view, worklist
    or API query can show it by accident. Admins see these on ``/admin``. (Schema changes
    are Alembic migrations: ``store/migrations``.)
    """

    __tablename__ = "quarantined_instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    reason: Mapped[str] = mapped_column(String(32), nullable=False)
    detail: Mapped[str] = mapped_column(Text, default="")
    sop_instance_uid: Mapped[str] = mapped_column(String(64), nullable=False, index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64), default="")
    study_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    series_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    # The station that already owns the UID (or the first copy), when there is one.
    conflicting_station_ae: Mapped[str] = mapped_column(String(16), default="")
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64), default="")
    file_path: Mapped[str] = mapped_column(Text, nullable=False)  # relative to the data directory
    file_size: Mapped[int] = mapped_column(Integer, default=0)
    sha256: Mapped[str] = mapped_column(String(64), default="")  # of the data set as received (no meta group)
    calling_ae: Mapped[str] = mapped_column(String(16), default="", index=True)
    peer_address: Mapped[str] = mapped_column(String(64), default="")
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)


class StationCertificate(Base):
    """A TLS client certificate pinned to a station (DICOM TLS, PS3.15 B.1): its SHA-256.

    A station with at least one row must present one of these certificates on the TLS
    port and may not use the plain port; see ``xray_triage.store.station_certs``. A table
    of its own (not a column of ``stations``) so existing databases gain it at start-up
    and a station can hold two certificates while one is being replaced.
    """

    __tablename__ = "station_certificates"
    __table_args__ = (UniqueConstraint("ae_title", "sha256", name="uq_station_certificates"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ae_title: Mapped[str] = mapped_column(String(16), nullable=False, index=True)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)  # lower-case hex of the DER certificate
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
