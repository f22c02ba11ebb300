"""The HTTP side: the teleconsult web view, the JSON API and the health check.

``create_app`` wires the routers (one module per area under ``consult_web/routes``; an
area's HTML pages are on its ``router``, its JSON API routes on its ``api_router`` under
``/api``), the error pages and small ASGI middlewares: a request-size limit and security
headers. Everything but ``/login``, ``/healthz`` and ``/static`` needs a logged-in user
(``deps.CurrentUser``). The API's OpenAPI document is served at ``/api/openapi.json`` to
logged-in users; it describes the API routes only (``app.state.api_routes``). There is no
Swagger page: it needs inline scripts, which the CSP forbids.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from consult_web.auth import CsrfError, LoginLimiter, NotAuthenticated, is_api, is_fhir, learn_known_networks
from consult_web.errors import LocalizedError, localized
from consult_web.i18n import translate
from consult_web.ohif import MOUNT as OHIF_MOUNT
from consult_web.ohif import OhifSite
from consult_web.schemas import API_ERRORS
from consult_web.templating import render, request_language
from xray_triage import __version__
from xray_triage.consults.errors import RuleError
from xray_triage.inference.card import ModelCard
from xray_triage.metrics import Metrics
from xray_triage.settings import Settings
from xray_triage.store.db import Database
from xray_triage.store.diskspace import StorageGuard
from xray_triage.store.ingest import Ingestor, TriagePolicy

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).resolve().parent / "static"

DISCLAIMER = (
    "AI output is decision support, not a diagnosis. The default model is a demonstration "
    "trained on a small public data set and is not a clinical device."
)

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


def create_app(
    db: Database,
    card: ModelCard | None = None,
    health: dict[str, Any] | None = None,
    settings: Settings | None = None,
    *,
    storage: StorageGuard | None = None,
    metrics: Metrics | None = None,
    ingestor: Ingestor | None = None,
) -> FastAPI:
    """Build the app around an open database; ``health`` holds live component state,
    ``storage`` the gateway's disk guard (one is made from ``settings`` if not given),
    ``ingestor`` the gateway's ingest path, shared with DICOMweb STOW-RS (likewise)."""
    from consult_web.routes import (
        admin,
        annotations,
        api,
        dicomweb,
        fhir,
        healthcheck,
        images,
        live,
        login,
        report,
        studies,
        worklist,
    )
    from consult_web.routes import metrics as metrics_route

    settings = settings or Settings()
    app = FastAPI(title="xray-triage", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.db = db
    app.state.card = card
    app.state.settings = settings
    app.state.health = health if health is not None else {}
    app.state.storage = storage or StorageGuard(settings.data_dir, settings.min_free_disk_mb)
    app.state.limiter = LoginLimiter(
        db,
        settings.login_max_failures,
        settings.login_lockout_s,
        backoff_s=settings.login_backoff_s,
        ipv6_prefix=settings.login_ipv6_prefix,
    )
    try:
        learn_known_networks(db, app.state.limiter)  # each user's own networks survive a restart
    except SQLAlchemyError as exc:  # e.g. a full disk at start-up: the server starts degraded instead
        log.warning("could not read users' known login networks; they are learned again at each login: %s", exc)
    app.state.live = live.make_hub(db, settings)  # one change poller and the stream limits
    # API token -> when this process last recorded its use (a throttle of that write: per process is
    # right; N web processes write a token's last use at most N times a minute, the value stays true).
    app.state.token_use = {}
    app.state.disclaimer = DISCLAIMER
    # Operators' metrics (/metrics): the composition root's registry, or one of this app's own.
    app.state.metrics = metrics if metrics is not None else Metrics(db).attach()
    app.state.ingestor = ingestor or Ingestor(
        settings.data_dir,
        db,
        TriagePolicy(settings.triage_modalities, settings.triage_body_parts),
        default_character_set=settings.default_character_set,
        storage=app.state.storage,
    )

    for module in (login, worklist, studies, report, images, admin, live, healthcheck, fhir, dicomweb):
        app.include_router(module.router)
    if settings.metrics_enabled:
        app.include_router(metrics_route.router)
    api_routes = APIRouter()
    for module in (api, images, annotations):
        api_routes.include_router(module.api_router, responses=API_ERRORS)
    app.state.api_routes = api_routes.routes  # what /api/openapi.json describes
    app.state.api_schema = None  # built on first request
    app.include_router(api_routes)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    ohif_csp = _mount_ohif(app, settings)
    _install_error_handlers(app)
    app.add_middleware(UnexpectedErrors)  # innermost: its 500 answer gets the security headers too
    app.add_middleware(SecurityHeaders, overrides={OHIF_MOUNT: ohif_csp} if ohif_csp else None)
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_request_bytes,
        larger={dicomweb.router.prefix + "/studies": settings.dicomweb_max_stow_bytes},
    )
    return app


def _mount_ohif(app: FastAPI, settings: Settings) -> str | None:
    """Serve OHIF's prebuilt files under /ohif/ when ``ohif_dist_dir`` is set; its CSP, else None.

    A folder that is not OHIF's dist/ stops the start-up (``OhifDistError``, one line)."""
    app.state.ohif = None
    if settings.ohif_dist_dir is None:
        return None
    from consult_web.routes import ohif

    app.state.ohif = OhifSite.load(settings.ohif_dist_dir)
    app.include_router(ohif.router)
    return app.state.ohif.content_security_policy


def _error(request: Request, status: int, message_key: str, detail: str = "") -> Response:
    if is_api(request):
        return JSONResponse({"detail": detail or translate("en", message_key)}, status_code=status)
    return render(
        request,
        "error.html",
        {"status": status, "message": translate(request_language(request), message_key), "detail": detail},
        status_code=status,
    )


def _install_error_handlers(app: FastAPI) -> None:
    from consult_web.routes import fhir

    @app.exception_handler(NotAuthenticated)
    async def _not_authenticated(request: Request, _exc: NotAuthenticated) -> Response:
        if is_fhir(request):
            return fhir.outcome(401, "login", "not authenticated: log in or send an API bearer token")
        if is_api(request) or request.url.path == "/events":
            return JSONResponse({"detail": "not authenticated"}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={_quote(target)}", status_code=303)

    @app.exception_handler(CsrfError)
    async def _csrf(request: Request, _exc: CsrfError) -> Response:
        return _error(request, 403, "error.csrf", "CSRF token missing or invalid")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if is_fhir(request):  # unknown resource type, wrong method...: an OperationOutcome
            code = {404: "not-found", 405: "not-supported", 413: "too-costly"}.get(exc.status_code, "processing")
            return fhir.outcome(exc.status_code, code, exc.detail if isinstance(exc.detail, str) else "error")
        key = {403: "error.forbidden", 404: "error.not_found", 405: "error.method", 413: "error.too_large"}.get(
            exc.status_code, "error.generic"
        )
        detail = exc.detail if isinstance(exc.detail, str) else ""
        if isinstance(exc, LocalizedError):
            message = exc.message(request_language(request))
            if is_api(request):  # English detail for programs, the user's language for the page's scripts
                response = JSONResponse({"detail": detail, "message": message}, status_code=exc.status_code)
                response.headers.update(exc.headers or {})
                return response
            detail = message
        response = _error(request, exc.status_code, key, detail)
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    @app.exception_handler(RuleError)
    async def _rule(request: Request, exc: RuleError) -> Response:
        # A domain rule said no (core knows no HTTP): answer as its localized HTTP error.
        return await _http(request, localized(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        if is_api(request):
            return JSONResponse({"detail": problems}, status_code=422)
        return _error(request, 400, "error.bad_request", problems)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        # Only what escapes the middlewares gets here (UnexpectedErrors answers the rest);
        # Starlette re-raises after this answer, so uvicorn closes the connection.
        return internal_error(request, exc)


def internal_error(request: Request, exc: BaseException) -> Response:
    """The generic 500 answer: a translated message and a reference to the log line, nothing
    of the exception (no traceback, no server path)."""
    reference = secrets.token_hex(4)
    log.error(
        "unhandled error",
        exc_info=exc,
        extra={"path": request.url.path, "method": request.method, "reference": reference},
    )
    language = request_language(request)
    message = translate(language, "error.internal")
    detail = translate(language, "error.reference", reference=reference)
    if is_api(request):
        english = translate("en", "error.internal")
        return JSONResponse({"detail": english, "message": message, "reference": reference}, status_code=500)
    return render(request, "error.html", {"status": 500, "message": message, "detail": detail}, status_code=500)


def _quote(value: str) -> str:
    from urllib.parse import quote

    return quote(value, safe="")


class UnexpectedErrors:
    """Answer an exception no route handled with the generic 500 page, and keep the connection.

    Starlette's ``ServerErrorMiddleware`` (where ``exception_handler(Exception)`` runs)
    re-raises after answering, and uvicorn then closes the transport of a response it has
    already started: the client's next request on that keep-alive connection was reset.
    Caught here, inside that middleware, the exception ends with a complete 500 response
    and the connection stays usable. If the response had already begun, nothing sane can
    be sent: the exception goes on and the server closes the connection.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:
                raise
            response = internal_error(Request(scope, receive), exc)
            await response(scope, receive, send)


class BodySizeLimit:
    """Refuse request bodies over ``max_bytes`` with 413, whether or not Content-Length is sent.

    ``larger``: path prefix -> its own limit (DICOMweb STOW-RS uploads whole studies).
    """

    def __init__(self, app: ASGIApp, max_bytes: int, larger: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.larger = larger or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        max_bytes = next(
            (limit for prefix, limit in self.larger.items() if path.startswith(prefix)), self.max_bytes
        )
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            await _plain_413(send)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > max_bytes:
                    raise StarletteHTTPException(status_code=413, detail="request body too large")
            return message

        await self.app(scope, limited_receive, send)


async def _plain_413(send: Send) -> None:
    body = b'{"detail":"request body too large"}'
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class SecurityHeaders:
    """CSP without inline scripts, no framing, no MIME sniffing, no referrer leaks; and HTML
    (pages and the fragments live updates re-fetch) is never cached: it names patients, and a
    shared station phone or a cached fragment must not show them again.

    ``overrides`` maps a path prefix (e.g. ``/ohif``) to the CSP of the answers under it."""

    HEADERS = [
        (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
        (b"x-content-type-options", b"nosniff"),
        (b"x-frame-options", b"DENY"),
        (b"referrer-policy", b"same-origin"),
    ]

    def __init__(self, app: ASGIApp, overrides: dict[str, str] | None = None) -> None:
        self.app = app
        self.overrides = [
            (prefix.rstrip("/"), [(b"content-security-policy", csp.encode()), *self.HEADERS[1:]])
            for prefix, csp in (overrides or {}).items()
        ]

    def _headers(self, path: str) -> list[tuple[bytes, bytes]]:
        for prefix, headers in self.overrides:
            if path == prefix or path.startswith(prefix + "/"):
                return headers
        return self.HEADERS

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = self._headers(scope.get("path", ""))

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                sent = list(message.get("headers", [])) + headers
                names = {name.lower(): value for name, value in sent}
                if names.get(b"content-type", b"").startswith(b"text/html") and b"cache-control" not in names:
                    sent.append((b"cache-control", b"no-store"))
                message["headers"] = sent
            await send(message)

        await self.app(scope, receive, send_with_headers)
