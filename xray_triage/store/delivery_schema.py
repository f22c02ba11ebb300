"""SQLAlchemy models of delivery to PACS: the destinations and the durable send queue.

``destinations``: the DICOM peers we C-STORE to (an AE title at host:port), what each gets
(``send``: a comma list of ``images``, ``ai-results``, ``consult-results``) and its health,
kept here (not in memory) so ``xray-triage destinations list`` in another process sees it.

``deliveries``: one row per object per destination, written by the ``delivery`` outbox
consumer in the transaction that advances its cursor, so every stored object is queued once
(unique on destination + SOP Instance UID + version) and a crash never loses one. A row is
``pending`` until the peer answers the C-STORE with Success (or a warning), then ``sent``;
failures only push ``next_attempt_at`` later (the queue never gives up).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from xray_triage.store.schema import Base, UTCDateTime, utcnow

CATEGORY_IMAGES = "images"
CATEGORY_AI_RESULTS = "ai-results"
CATEGORY_CONSULT_RESULTS = "consult-results"
CATEGORIES = (CATEGORY_IMAGES, CATEGORY_AI_RESULTS, CATEGORY_CONSULT_RESULTS)

DELIVERY_PENDING = "pending"
DELIVERY_SENT = "sent"

SOURCE_CLI = "cli"  # added with `xray-triage destinations add` (or the admin page)
SOURCE_CONFIG = "config"  # a [[destinations]] table of the TOML file, synchronised at start-up


class Destination(Base):
    """A DICOM peer (PACS) that objects are C-STOREd to."""

    __tablename__ = "destinations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    ae_title: Mapped[str] = mapped_column(String(16), nullable=False)
    host: Mapped[str] = mapped_column(String(255), nullable=False)
    port: Mapped[int] = mapped_column(Integer, nullable=False)
    send: Mapped[str] = mapped_column(String(128), nullable=False)  # comma list of CATEGORIES
    tls: Mapped[bool] = mapped_column(Boolean, default=False, nullable=False)
    rate_limit_bytes_per_s: Mapped[int | None] = mapped_column(Integer, nullable=True)  # None: unlimited
    source: Mapped[str] = mapped_column(String(16), default=SOURCE_CLI, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # Health, updated by the sender after every attempt.
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0, nullable=False)
    failing_since: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    last_error_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_success_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # The peer itself is backed off (down, refusing associations): no association before this.
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    @property
    def categories(self) -> tuple[str, ...]:
        return tuple(part for part in self.send.split(",") if part)


class Delivery(Base):
    """One object queued for one destination (at-least-once; sent once the peer said Success)."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("destination_id", "sop_instance_uid", "version", name="uq_deliveries_object"),
        Index("ix_deliveries_due", "destination_id", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    destination_id: Mapped[int] = mapped_column(
        ForeignKey("destinations.id", ondelete="CASCADE"), nullable=False, index=True
    )
    sop_instance_uid: Mapped[str] = mapped_column(String(64), nullable=False)
    # A new version of an object with the same SOP Instance UID (none yet: always 0).
    version: Mapped[int] = mapped_column(Integer, default=0, nullable=False)
    study_uid: Mapped[str] = mapped_column(String(64), nullable=False, index=True)
    category: Mapped[str] = mapped_column(String(32), nullable=False)
    event_id: Mapped[int] = mapped_column(Integer, nullable=False)  # the outbox event that queued it
    state: Mapped[str] = mapped_column(String(16), default=DELIVERY_PENDING, nullable=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0, nullable=False)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, nullable=False)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, nullable=False)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    sent_status: Mapped[int | None] = mapped_column(Integer, nullable=True)  # the peer's C-STORE status
