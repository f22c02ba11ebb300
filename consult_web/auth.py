"""Who is asking: session cookies for the browser, bearer tokens for the JSON API.

Every route except ``/login``, ``/healthz`` and ``/static`` depends on
``current_user``. It also enforces CSRF protection: a state-changing request
(POST/PUT/PATCH/DELETE) authenticated by the session cookie must carry the
session's CSRF token in the ``X-CSRF-Token`` header or a ``csrf_token`` form
field, and, when the browser sends an ``Origin`` header, come from this site.
Requests authenticated by an API token carry no cookie and need no CSRF token.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from typing import Any
from urllib.parse import urlsplit

from fastapi import Depends, HTTPException, Request
from starlette.concurrency import run_in_threadpool

from xray_triage.store.consult_schema import ROLE_ADMIN
from xray_triage.store.db import Database
from xray_triage.store.users import AuthUser, record_api_token_use, user_for_api_token, user_for_session

SESSION_COOKIE = "xrt_session"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
TOKEN_USE_INTERVAL_S = 60.0
SWEEP_AT = 1024  # failed-login keys kept before expired ones are swept


class NotAuthenticated(Exception):
    """No valid session or token: pages redirect to the login page, the API answers 401."""


class CsrfError(Exception):
    """A state-changing request without the right CSRF token (or from another origin)."""


def is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def client_ip(request: Request) -> str:
    return request.client.host if request.client else ""


async def current_user(request: Request) -> AuthUser:
    authorization = request.headers.get("authorization", "")
    if authorization.lower().startswith("bearer "):
        if not is_api(request):
            raise NotAuthenticated()  # tokens are for the JSON API only
        user = await run_in_threadpool(_token_user, request.app.state, authorization[7:].strip())
    else:
        cookie = request.cookies.get(SESSION_COOKIE)
        user = await run_in_threadpool(_session_user, request.app.state.db, cookie) if cookie else None
        if user is not None and request.method not in SAFE_METHODS:
            await _check_csrf(request, user)
    if user is None:
        raise NotAuthenticated()
    request.state.user = user
    return user


def _session_user(db: Database, cookie: str) -> AuthUser | None:
    with db.read_session() as session:
        return user_for_session(session, cookie)


def _token_user(state: Any, token: str) -> AuthUser | None:
    """Look the token up without the write lock; record its use at most once a minute per process."""
    with state.db.read_session() as session:
        user = user_for_api_token(session, token)
    if user is not None:
        now = time.monotonic()
        last_recorded = state.token_use.get(token)
        if last_recorded is None or now - last_recorded > TOKEN_USE_INTERVAL_S:
            state.token_use[token] = now
            with state.db.session() as session:
                record_api_token_use(session, token)
    return user


async def _check_csrf(request: Request, user: AuthUser) -> None:
    origin = request.headers.get("origin")
    if origin and origin != "null" and urlsplit(origin).netloc != request.headers.get("host", ""):
        raise CsrfError()
    sent = request.headers.get(CSRF_HEADER)
    if sent is None and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        sent = (await request.form()).get(CSRF_FIELD)
    if not sent or not user.csrf_token or not secrets.compare_digest(str(sent), user.csrf_token):
        raise CsrfError()


def require_roles(*roles: str):  # type: ignore[no-untyped-def]
    """Dependency factory: the user must have one of ``roles`` (else 403)."""

    async def dependency(user: AuthUser = Depends(current_user)) -> AuthUser:
        if user.role not in roles:
            raise HTTPException(status_code=403, detail="forbidden")
        return user

    return dependency


require_admin = require_roles(ROLE_ADMIN)


class LoginLimiter:
    """Failed-login counter (in memory) that a stranger cannot turn against a user.

    Three counters, each over ``window_s`` seconds:

    - one user name from one client IP: locked after ``max_failures`` failures, so
      password guessing from one place stops at once;
    - one client IP over all names, and one user name over all IPs: locked after
      ``SPREAD_FACTOR`` x ``max_failures``, which bounds name sprays and guessing from
      many addresses.

    Locking a name on its own after a few failures from anywhere would let anyone lock
    a specialist out by typing wrong passwords for them; here, locking a user out
    everywhere takes failures from several addresses. A lock lasts until the oldest
    failure leaves the window. A successful login clears that user's counters. Kept in
    memory on purpose: the web app runs in one process, and a restart giving a fresh
    window is harmless.
    """

    SPREAD_FACTOR = 4

    def __init__(self, max_failures: int, window_s: float) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _limits(self, username: str, ip: str) -> list[tuple[str, int]]:
        name = username.lower()
        spread = self.SPREAD_FACTOR * self.max_failures
        return [(f"u+ip:{name}\n{ip}", self.max_failures), (f"u:{name}", spread), (f"ip:{ip}", spread)]

    def _recent(self, key: str, now: float) -> int:
        """Failures of ``key`` inside the window; keys with none left are forgotten (bounded memory)."""
        entries = self._failures.get(key)
        if entries is None:
            return 0
        while entries and entries[0] <= now - self.window_s:
            entries.popleft()
        if not entries:
            del self._failures[key]
        return len(entries)

    def retry_after(self, username: str, ip: str) -> float:
        """Seconds until a login may be tried again; 0 when not locked."""
        now = time.monotonic()
        waits = []
        with self._lock:
            for key, limit in self._limits(username, ip):
                if self._recent(key, now) >= limit:
                    waits.append(self._failures[key][0] + self.window_s - now)
        return max(waits, default=0.0)

    def failed(self, username: str, ip: str) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._failures) >= SWEEP_AT:  # a spray of names or addresses: drop what expired
                for key in list(self._failures):
                    self._recent(key, now)
            for key, _limit in self._limits(username, ip):
                self._recent(key, now)
                self._failures.setdefault(key, deque()).append(now)

    def succeeded(self, username: str, ip: str) -> None:
        with self._lock:
            for key, _limit in self._limits(username, ip)[:2]:  # the user's counters, not the IP's
                self._failures.pop(key, None)
