"""Users, passwords, browser sessions and API tokens.

Passwords are hashed with argon2id (argon2-cffi). Session cookies and API tokens
are random 256-bit values; only their SHA-256 is stored, so a copy of the
database does not let anyone log in.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from xray_triage.store.consult_schema import (
    LANGUAGES,
    ROLE_STATION,
    ROLES,
    ApiToken,
    User,
    UserSession,
)
from xray_triage.store.db import Database
from xray_triage.store.schema import Station, utcnow

MIN_PASSWORD_LENGTH = 10
USERNAME_RE = re.compile(r"^[A-Za-z0-9._@-]{2,64}$")
API_TOKEN_PREFIX = "xrt_"

_hasher = PasswordHasher()
# Verifying against this when the user does not exist keeps the response time the same,
# so a login form does not tell which usernames exist.
_DUMMY_HASH = _hasher.hash("not-a-real-password-" + secrets.token_hex(8))


class UserError(ValueError):
    """Bad user input (duplicate name, unknown role or station, weak password)."""


@dataclass(frozen=True)
class AuthUser:
    """The logged-in user as the web app sees it (detached from any DB session)."""

    id: int
    username: str
    display_name: str
    role: str
    station_ae: str | None
    language: str
    timezone: str
    csrf_token: str | None = None  # None for API-token requests (no cookie, no CSRF risk)

    @property
    def label(self) -> str:
        return self.display_name or self.username


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"password too short: at least {MIN_PASSWORD_LENGTH} characters")
    return _hasher.hash(password)


def check_timezone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise UserError(f"unknown time zone {name!r} (use an IANA name such as Asia/Ho_Chi_Minh)") from exc
    return name


def add_user(
    session: Session,
    username: str,
    password: str,
    role: str,
    *,
    station_ae: str | None = None,
    display_name: str = "",
    language: str = "vi",
    timezone: str = "Asia/Ho_Chi_Minh",
) -> User:
    if not USERNAME_RE.match(username):
        raise UserError(f"invalid user name {username!r}: 2-64 letters, digits or . _ @ -")
    if role not in ROLES:
        raise UserError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    if role == ROLE_STATION:
        if not station_ae:
            raise UserError("a station user needs --station AE_TITLE (the station whose studies it sees)")
        if session.scalar(select(Station).where(Station.ae_title == station_ae.strip())) is None:
            raise UserError(
                f"station {station_ae!r} is not registered (xray-triage stations add {station_ae})"
            )
        station_ae = station_ae.strip()
    elif station_ae:
        raise UserError("--station applies to station users only")
    if language not in LANGUAGES:
        raise UserError(f"unknown language {language!r}: one of {', '.join(LANGUAGES)}")
    if session.scalar(select(User).where(User.username == username)):
        raise UserError(f"user {username!r} already exists")
    user = User(
        username=username,
        display_name=display_name.strip(),
        password_hash=hash_password(password),
        role=role,
        station_ae=station_ae,
        language=language,
        timezone=check_timezone(timezone),
    )
    session.add(user)
    session.flush()
    return user


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.username)))


def get_user(session: Session, username: str) -> User | None:
    return session.scalar(select(User).where(User.username == username))


def set_disabled(session: Session, username: str, disabled: bool = True) -> User:
    user = get_user(session, username)
    if user is None:
        raise UserError(f"no user {username!r}")
    user.disabled = disabled
    if disabled:  # a disabled user is logged out everywhere and its tokens stop working
        session.execute(delete(UserSession).where(UserSession.user_id == user.id))
        _revoke_tokens(session, user)
    return user


def set_password(session: Session, username: str, password: str) -> User:
    user = get_user(session, username)
    if user is None:
        raise UserError(f"no user {username!r}")
    user.password_hash = hash_password(password)
    session.execute(delete(UserSession).where(UserSession.user_id == user.id))
    return user


def verify_login(db: Database, username: str, password: str) -> int | None:
    """The id of the active user with this password, else None (same work either way).

    The argon2 check (tens of milliseconds on purpose) runs outside any transaction,
    so a login never holds the database while it hashes.
    """
    with db.read_session() as session:
        user = get_user(session, username)
        found = (user.id, user.password_hash, user.disabled) if user is not None else None
    try:
        _hasher.verify(found[1] if found else _DUMMY_HASH, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return None
    if found is None or found[2]:
        return None
    return found[0]


def record_login(session: Session, user_id: int, password: str) -> User:
    """Note the login time, and upgrade the hash if argon2's parameters have changed since."""
    user = session.get(User, user_id)
    assert user is not None, user_id
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = _hasher.hash(password)
    user.last_login_at = utcnow()
    return user


def to_auth_user(user: User, csrf_token: str | None) -> AuthUser:
    return AuthUser(
        id=user.id,
        username=user.username,
        display_name=user.display_name,
        role=user.role,
        station_ae=user.station_ae,
        language=user.language,
        timezone=user.timezone,
        csrf_token=csrf_token,
    )


# -- browser sessions ------------------------------------------------------------------


def create_session(session: Session, user: User, *, lifetime: timedelta, ip: str = "") -> str:
    """Start a login; returns the cookie value (shown once, stored only hashed)."""
    token = secrets.token_urlsafe(32)
    session.add(
        UserSession(
            token_hash=sha256_hex(token),
            user_id=user.id,
            csrf_token=secrets.token_urlsafe(32),
            expires_at=utcnow() + lifetime,
            ip=ip[:64],
        )
    )
    session.execute(delete(UserSession).where(UserSession.expires_at < utcnow()))  # housekeeping
    return token


def user_for_session(session: Session, token: str) -> AuthUser | None:
    row = session.scalar(select(UserSession).where(UserSession.token_hash == sha256_hex(token)))
    if row is None or row.expires_at < utcnow():
        return None
    user = session.get(User, row.user_id)
    if user is None or user.disabled:
        return None
    return to_auth_user(user, row.csrf_token)


def end_session(session: Session, token: str) -> None:
    session.execute(delete(UserSession).where(UserSession.token_hash == sha256_hex(token)))


# -- API tokens ------------------------------------------------------------------------


def create_api_token(session: Session, username: str, name: str = "") -> str:
    user = get_user(session, username)
    if user is None:
        raise UserError(f"no user {username!r}")
    if user.disabled:
        raise UserError(f"user {username!r} is disabled")
    token = API_TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiToken(token_hash=sha256_hex(token), user_id=user.id, name=name))
    return token


def user_for_api_token(session: Session, token: str) -> AuthUser | None:
    """The active user of an unrevoked token (a pure read; see ``record_api_token_use``)."""
    row = session.scalar(select(ApiToken).where(ApiToken.token_hash == sha256_hex(token)))
    if row is None or row.revoked:
        return None
    user = session.get(User, row.user_id)
    if user is None or user.disabled:
        return None
    return to_auth_user(user, None)


def record_api_token_use(session: Session, token: str) -> None:
    session.execute(
        update(ApiToken).where(ApiToken.token_hash == sha256_hex(token)).values(last_used_at=utcnow())
    )


def revoke_api_tokens(session: Session, username: str) -> int:
    user = get_user(session, username)
    if user is None:
        raise UserError(f"no user {username!r}")
    return _revoke_tokens(session, user)


def _revoke_tokens(session: Session, user: User) -> int:
    result = session.execute(
        update(ApiToken).where(ApiToken.user_id == user.id, ApiToken.revoked.is_(False)).values(revoked=True)
    )
    return int(result.rowcount or 0)
