"""Who is asking: session cookies for the browser, bearer tokens for programs (the JSON API,
DICOMweb and the viewer's rendered pictures: every route that is not an HTML page).

Every route except ``/login``, ``/healthz`` and ``/static`` depends on
``current_user``. It also enforces CSRF protection: a state-changing request
(POST/PUT/PATCH/DELETE) authenticated by the session cookie must carry the
session's CSRF token in the ``X-CSRF-Token`` header or a ``csrf_token`` form
field, and, when the browser sends an ``Origin`` header, come from this site.
Requests authenticated by an API token carry no cookie and need no CSRF token.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from fastapi import Request
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from xray_triage.store.consult_schema import AuditEvent, LoginFailure
from xray_triage.store.db import Database
from xray_triage.store.schema import utcnow
from xray_triage.store.users import AuthUser, record_api_token_use, user_for_api_token, user_for_session

SESSION_COOKIE = "xrt_session"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
TOKEN_USE_INTERVAL_S = 60.0
SWEEP_AT = 1024  # user names whose audit-log look-up time is kept before the table is cleared


class NotAuthenticated(Exception):
    """No valid session or token: pages redirect to the login page, the API answers 401."""


class CsrfError(Exception):
    """A state-changing request without the right CSRF token (or from another origin)."""


# Routes for programs, not pages: errors are JSON, an unknown user gets 401 (not the login page).
MACHINE_PREFIXES = ("/api/", "/dicomweb/")
# Machine-facing paths outside those prefixes that take bearer tokens and answer errors as JSON.
MACHINE_PATHS = frozenset({"/metrics", "/dicomweb"})
# Non-HTML routes outside those prefixes that also take a bearer token (the viewer's pictures).
TOKEN_ROUTES = re.compile(r"^/studies/[^/]+/images/[^/]+/render$")


def is_api(request: Request) -> bool:
    """A route for programs (JSON API, DICOMweb, metrics): JSON errors and 401 instead of a login redirect."""
    return request.url.path.startswith(MACHINE_PREFIXES) or request.url.path in MACHINE_PATHS


def is_fhir(request: Request) -> bool:
    """The FHIR endpoints (``/fhir``): bearer tokens accepted, errors as OperationOutcome."""
    return request.url.path == "/fhir" or request.url.path.startswith("/fhir/")


def accepts_token(request: Request) -> bool:
    """Whether a bearer token may authenticate this request: every non-HTML route."""
    return is_api(request) or is_fhir(request) or bool(TOKEN_ROUTES.match(request.url.path))


def client_ip(request: Request) -> str:
    return request.client.host if request.client else ""


async def current_user(request: Request) -> AuthUser:
    authorization = request.headers.get("authorization", "")
    if authorization.lower().startswith("bearer "):
        if not accepts_token(request):
            raise NotAuthenticated()  # tokens are for programs: not for the HTML pages
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


class LoginLimiter:
    """Failed-login limits, shared through the database, that slow a guesser without letting a
    stranger lock a user out.

    Addresses are grouped into networks: an IPv4 address is its own network, an IPv6
    address counts as its /``ipv6_prefix`` (default /64, what one subscriber gets), so
    hopping between the addresses of one prefix gains nothing. Over ``window_s`` seconds:

    - one user name from one network: locked after ``max_failures`` failures, so
      password guessing from one place stops at once;
    - one network over all names: locked after ``SPREAD_FACTOR`` x ``max_failures``
      (name sprays);
    - one user name over all networks: never a plain lock. Past ``SPREAD_FACTOR`` x
      ``max_failures`` failures each further try from a network must wait an
      exponential back-off (``backoff_s``, doubled per further failure, at most
      ``window_s``) after the name's last failure, so guessing from many networks slows
      to a trickle. Networks where the user has logged in successfully (the last
      ``KNOWN_NETWORKS`` per user; ``learn_known_networks`` reloads them from the
      audit log at start-up) are exempt: strangers failing elsewhere cannot lock a
      specialist out of her own hospital's network.

    A lock or back-off lasts until the failures behind it leave the window. A successful
    login clears the (name, network) failures only: clearing the name's failures would let
    a guesser reset the back-off whenever the real user logs in.

    Several web processes (``serve --roles web``, on one or more machines) share one count:
    each failure is a row of ``login_failures`` (``failed`` inserts it and prunes the rows
    that left the window, in one short write transaction, or in the caller's ``session``),
    and ``retry_after`` counts them with a read that never takes SQLite's write lock. A
    successful login writes only when that (name, network) has failures to clear. Known
    networks are cached per process; one this process has not seen is looked up in the
    audit log (at most once per ``KNOWN_REFRESH_S`` per name, and only for a name past the
    spread limit), so a login through another process exempts its network here too.

    ``clock`` (seconds) is injectable so tests need no sleeps; the default is the wall clock
    (``time.time``), which processes on several machines agree on, unlike a monotonic one.
    """

    SPREAD_FACTOR = 4
    KNOWN_NETWORKS = 8
    KNOWN_REFRESH_S = 10.0

    def __init__(
        self,
        db: Database,
        max_failures: int,
        window_s: float,
        *,
        backoff_s: float = 1.0,
        ipv6_prefix: int = 64,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.max_failures = max_failures
        self.window_s = window_s
        self.backoff_s = backoff_s
        self.ipv6_prefix = ipv6_prefix
        self.clock = clock
        self._known: dict[str, OrderedDict[str, None]] = {}  # user name -> networks of successful logins
        self._known_looked_up: dict[str, float] = {}  # user name -> when the audit log was last read for it
        self._lock = threading.Lock()

    def network(self, ip: str) -> str:
        """The network an address is counted under: itself (IPv4) or its IPv6 prefix."""
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return ip[:64]  # not an address (a test client's name): counted as itself
        if isinstance(address, ipaddress.IPv6Address):
            if address.ipv4_mapped is not None:
                return str(address.ipv4_mapped)
            return str(ipaddress.IPv6Network((address, self.ipv6_prefix), strict=False))
        return str(address)

    def _names(self, username: str, ip: str) -> tuple[str, str]:
        return username.lower()[:64], self.network(ip)

    def retry_after(self, username: str, ip: str) -> float:
        """Seconds until a login for ``username`` from ``ip`` may be tried again; 0 when allowed."""
        now = self.clock()
        name, net = self._names(username, ip)
        since = now - self.window_s
        spread = self.SPREAD_FACTOR * self.max_failures
        recent = LoginFailure.at > since
        with self.db.read_session() as session:

            def count(*where: Any) -> tuple[int, float | None, float | None]:
                row = session.execute(
                    select(func.count(), func.min(LoginFailure.at), func.max(LoginFailure.at)).where(recent, *where)
                ).one()
                return int(row[0]), row[1], row[2]

            pair = count(LoginFailure.username == name, LoginFailure.network == net)
            by_net = count(LoginFailure.network == net)
            by_name = count(LoginFailure.username == name)
            waits = [
                oldest + self.window_s - now
                for (failures, oldest, _), limit in ((pair, self.max_failures), (by_net, spread))
                if failures >= limit and oldest is not None
            ]
            over = by_name[0] - spread
            if over >= 0 and by_name[2] is not None and not self._is_known(session, name, net, now):
                delay = min(self.backoff_s * 2.0**over, self.window_s)
                waits.append(by_name[2] + delay - now)
        return max([w for w in waits if w > 0], default=0.0)

    def _is_known(self, session: Session, name: str, net: str, now: float) -> bool:
        """Whether ``name`` has logged in from ``net``: this process's cache, else (rarely) the audit log."""
        with self._lock:
            if net in self._known.get(name, {}):
                return True
            looked_up = self._known_looked_up.get(name)
            if looked_up is not None and now - looked_up < self.KNOWN_REFRESH_S:
                return False
            if len(self._known_looked_up) >= SWEEP_AT:
                self._known_looked_up.clear()
            self._known_looked_up[name] = now
        ips = session.scalars(
            select(AuditEvent.ip)
            .where(AuditEvent.action == "login", func.lower(AuditEvent.username) == name, AuditEvent.ip != "")
            .order_by(AuditEvent.id.desc())
            .limit(4 * self.KNOWN_NETWORKS)
        ).all()
        for ip in reversed(ips):
            self.remember(name, ip)
        with self._lock:
            return net in self._known.get(name, {})

    def failed(self, username: str, ip: str, session: Session | None = None) -> None:
        """Record a failure (in ``session``, the caller's write transaction, when given)."""
        if session is None:
            with self.db.session() as own:
                self.failed(username, ip, own)
            return
        now = self.clock()
        name, net = self._names(username, ip)
        session.execute(delete(LoginFailure).where(LoginFailure.at <= now - self.window_s))
        session.add(LoginFailure(username=name, network=net, at=now))
        session.flush()

    def succeeded(self, username: str, ip: str, session: Session | None = None) -> None:
        """Forget the (name, network) failures and remember the network as the user's own.

        Given the caller's write transaction (the login's), the delete rides on it; alone,
        it writes only when there is something to clear.
        """
        name, net = self._names(username, ip)
        pair = (LoginFailure.username == name, LoginFailure.network == net)
        if session is not None:
            session.execute(delete(LoginFailure).where(*pair))
        else:
            with self.db.read_session() as reading:
                found = reading.scalar(select(LoginFailure.id).where(*pair).limit(1))
            if found is not None:
                with self.db.session() as writing:
                    writing.execute(delete(LoginFailure).where(*pair))
        self.remember(username, ip)

    def remember(self, username: str, ip: str) -> None:
        """Mark ``ip``'s network as one where ``username`` logs in (exempt from the name's back-off)."""
        net = self.network(ip)
        with self._lock:
            known = self._known.setdefault(username.lower()[:64], OrderedDict())
            known[net] = None
            known.move_to_end(net)
            while len(known) > self.KNOWN_NETWORKS:
                known.popitem(last=False)

    def reset(self) -> None:
        """Forget every failure, in every process (tests, or an admin after an incident); known networks stay."""
        with self.db.session() as session:
            session.execute(delete(LoginFailure))


def learn_known_networks(db: Database, limiter: LoginLimiter, *, days: float = 90, rows: int = 5000) -> int:
    """Teach a new limiter (after a restart) where each user has logged in, from the audit log.

    The ``login`` events of the last ``days`` (the newest ``rows`` of them) carry the user
    name and client address; without this a restart would forget every user's own networks,
    and an attack running at that moment could hold them back. Returns the events read.
    """
    since = utcnow() - timedelta(days=days)
    with db.read_session() as session:
        found = session.execute(
            select(AuditEvent.username, AuditEvent.ip)
            .where(AuditEvent.action == "login", AuditEvent.at >= since, AuditEvent.ip != "")
            .order_by(AuditEvent.id.desc())
            .limit(rows)
        ).all()
    for username, ip in reversed(found):  # oldest first: the newest networks stay when a user has many
        limiter.remember(username, ip)
    return len(found)
