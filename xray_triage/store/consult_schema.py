"""SQLAlchemy models of the teleconsult side: users, sessions, API tokens, audit log,
consults with their threaded messages, and image annotations.

They share ``Base`` with the study store (``schema.py``) so one ``create_all`` makes
every table, and use only portable types, like the rest of the schema.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from xray_triage.store.schema import Base, UTCDateTime, utcnow

ROLE_STATION = "station"
ROLE_SPECIALIST = "specialist"
ROLE_ADMIN = "admin"
ROLES = (ROLE_STATION, ROLE_SPECIALIST, ROLE_ADMIN)

CONSULT_REQUESTED = "requested"
CONSULT_IN_REVIEW = "in_review"
CONSULT_ANSWERED = "answered"
CONSULT_CLOSED = "closed"
CONSULT_STATUSES = (CONSULT_REQUESTED, CONSULT_IN_REVIEW, CONSULT_ANSWERED, CONSULT_CLOSED)
# Worklist order within one AI priority: open requests first, closed last, no consult in between.
CONSULT_STATUS_RANK = {
    CONSULT_REQUESTED: 0,
    CONSULT_IN_REVIEW: 1,
    CONSULT_ANSWERED: 2,
    None: 3,
    CONSULT_CLOSED: 4,
}

URGENCIES = ("routine", "urgent", "emergency")
CONCLUSIONS = ("normal", "follow_up_station", "refer_hospital", "urgent_transfer")

LANGUAGES = ("vi", "en")  # of the web view; Vietnamese is the default


class User(Base):
    """A person who logs in to the web view (or uses the JSON API with a token)."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    display_name: Mapped[str] = mapped_column(String(200), default="")
    password_hash: Mapped[str] = mapped_column(String(255), nullable=False)
    role: Mapped[str] = mapped_column(String(16), nullable=False)
    station_ae: Mapped[str | None] = mapped_column(String(16), nullable=True)  # station users only
    language: Mapped[str] = mapped_column(String(8), default="vi")
    timezone: Mapped[str] = mapped_column(String(64), default="Asia/Ho_Chi_Minh")
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class UserSession(Base):
    """A browser login. Only the SHA-256 of the cookie value is stored."""

    __tablename__ = "user_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), nullable=False, index=True)
    csrf_token: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    ip: Mapped[str] = mapped_column(String(64), default="")


class ApiToken(Base):
    """A per-user token for the JSON API (``Authorization: Bearer ...``); stored hashed."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), nullable=False, index=True)
    name: Mapped[str] = mapped_column(String(100), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class AuditEvent(Base):
    """Who viewed or changed which study, and when. Append-only."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    user_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    username: Mapped[str] = mapped_column(String(64), default="")
    action: Mapped[str] = mapped_column(String(64), nullable=False)
    study_uid: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    detail: Mapped[dict] = mapped_column(JSON, default=dict)
    ip: Mapped[str] = mapped_column(String(64), default="")


class Consult(Base):
    """A station's request for a specialist's opinion on one study."""

    __tablename__ = "consults"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), nullable=False, index=True)
    requested_by_id: Mapped[int] = mapped_column(ForeignKey("users.id"), nullable=False)
    question: Mapped[str] = mapped_column(Text, nullable=False)
    urgency: Mapped[str] = mapped_column(String(16), default="routine")
    status: Mapped[str] = mapped_column(String(16), default=CONSULT_REQUESTED, index=True)
    claimed_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    conclusion: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    requested_by: Mapped[User] = relationship(foreign_keys=[requested_by_id])
    claimed_by: Mapped[User | None] = relationship(foreign_keys=[claimed_by_id])
    messages: Mapped[list[ConsultMessage]] = relationship(
        back_populates="consult", order_by="ConsultMessage.id"
    )


class ConsultMessage(Base):
    __tablename__ = "consult_messages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    consult_id: Mapped[int] = mapped_column(ForeignKey("consults.id"), nullable=False, index=True)
    author_id: Mapped[int] = mapped_column(ForeignKey("users.id"), nullable=False)
    body: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    consult: Mapped[Consult] = relationship(back_populates="messages")
    author: Mapped[User] = relationship()


class Annotation(Base):
    """A mark on one image; geometry in the original image's pixel coordinates (x = column, y = row).

    Shapes: rect {x, y, w, h}; ellipse {cx, cy, rx, ry}; arrow {x1, y1, x2, y2};
    freehand {points: [[x, y], ...]}; text {x, y} (the text is ``label``).
    """

    __tablename__ = "annotations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), nullable=False, index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), nullable=False, index=True)
    author_id: Mapped[int] = mapped_column(ForeignKey("users.id"), nullable=False)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    geometry: Mapped[dict] = mapped_column(JSON, nullable=False)
    label: Mapped[str] = mapped_column(String(500), default="")
    color: Mapped[str] = mapped_column(String(16), default="#ffd400")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    author: Mapped[User] = relationship()


class LoginFailure(Base):
    """One failed login (``consult_web.auth.LoginLimiter``), shared by every web process.

    ``at`` is the limiter's clock in seconds (wall-clock epoch seconds in a server, so that
    processes on several machines agree); rows older than the limiter's window are pruned
    whenever a failure is recorded, so the table holds only the current window's failures.
    """

    __tablename__ = "login_failures"
    __table_args__ = (
        Index("ix_login_failures_username_at", "username", "at"),
        Index("ix_login_failures_network_at", "network", "at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), nullable=False)  # lower-cased
    network: Mapped[str] = mapped_column(String(64), nullable=False)  # an IPv4 address or an IPv6 prefix
    at: Mapped[float] = mapped_column(Float, nullable=False, index=True)
