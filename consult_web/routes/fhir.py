"""FHIR R4 (read-only search) under ``/fhir``: ImagingStudy, DiagnosticReport, ServiceRequest.

Same login as the rest of the app: the session cookie or an API bearer token
(``Authorization: Bearer xrt_...``). A station user sees only its station's studies and
what hangs off them. Answers are ``application/fhir+json``: a ``searchset`` Bundle for
a search, a resource for a read (``/fhir/<Type>/<id>``), an OperationOutcome for an error
(400 bad search, 401 not logged in, 404 unknown or invisible resource). Resources are
built and validated by core (``xray_triage/fhir``); this module only parses the request
and serializes. Each study a response shows is recorded in the audit log (``study.view``,
``via: fhir``), as the JSON API's study view is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import Response

from consult_web.audit import audit
from consult_web.deps import AppSettings, Card, CurrentUser, Db, ReadSession
from xray_triage.fhir import records
from xray_triage.fhir.resources import coding_from_dicom, operation_outcome, searchset
from xray_triage.fhir.search import Search, SearchError, parse
from xray_triage.inference.card import ModelCard
from xray_triage.store.db import Database
from xray_triage.store.users import AuthUser

log = logging.getLogger(__name__)
router = APIRouter(prefix="/fhir")
FHIR_JSON = "application/fhir+json"
DEFAULT_COUNT = 50


def fhir_response(resource: Any, status_code: int = 200) -> Response:
    return Response(resource.model_dump_json(exclude_none=True), status_code=status_code, media_type=FHIR_JSON)


def outcome(status_code: int, code: str, diagnostics: str) -> Response:
    return fhir_response(operation_outcome(code, diagnostics), status_code)


def _card_info(card: ModelCard | None) -> records.CardInfo | None:
    if card is None:
        return None
    # [codes] (label -> scheme, value, meaning) where the card has them (results-objects branch).
    codes = {
        label: coding
        for label, code in (getattr(card, "codes", None) or {}).items()
        if (coding := coding_from_dicom(code.scheme, code.value, code.meaning)) is not None
    }
    return records.CardInfo(card.model_version, card.sha256, codes)


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/") + "/fhir"


def _study_uids(resources: list[Any]) -> list[str]:
    """The studies the resources show (ImagingStudy id, or the ImagingStudy they reference)."""
    uids = []
    for resource in resources:
        if resource.get_resource_type() == "ImagingStudy":
            uids.append(resource.id)
            continue
        for reference in (getattr(resource, "imagingStudy", None) or []) + (getattr(resource, "supportingInfo", None) or []):
            if reference.reference and reference.reference.startswith("ImagingStudy/"):
                uids.append(reference.reference.removeprefix("ImagingStudy/"))
    return list(dict.fromkeys(uids))


def _audit(db: Database, user: AuthUser, request: Request, kind: str, resources: list[Any]) -> None:
    """Each study shown is a ``study.view`` in the audit log (via fhir), as the API's study view is."""
    uids = _study_uids(resources)
    if not uids:
        return
    with db.session() as session:
        for uid in uids:
            audit(session, user, "study.view", study_uid=uid, request=request, via="fhir", resource=kind)


def _search(
    request: Request,
    settings: Any,
    kind: str,
    run: Callable[[Search], records.Page],
    audited: tuple[Database, AuthUser],
) -> Response:
    params = list(request.query_params.multi_items())
    try:
        search = parse(params, DEFAULT_COUNT, settings.fhir_max_count)
    except SearchError as exc:
        return outcome(400, "invalid", str(exc))
    page = run(search)
    _audit(*audited, request, kind, page.resources)
    base = _base(request)
    self_url = f"{base}/{kind}" + (f"?{request.url.query}" if request.url.query else "")
    next_url = None
    if search.offset + len(page.resources) < page.total:
        kept = [(k, v) for k, v in request.query_params.multi_items() if k != "_offset"]
        next_url = f"{base}/{kind}?" + urlencode([*kept, ("_offset", str(search.offset + search.count))])
    return fhir_response(searchset(page.resources, page.total, self_url, base, next_url))


def _read(
    request: Request, kind: str, resource_id: str, run: Callable[[Search], records.Page], audited: tuple[Database, AuthUser]
) -> Response:
    page = run(Search(ids=[resource_id], count=1))
    if not page.resources:
        return outcome(404, "not-found", f"{kind}/{resource_id} not found")
    _audit(*audited, request, kind, page.resources)
    return fhir_response(page.resources[0])


@router.get("/ImagingStudy")
def search_imaging_studies(request: Request, user: CurrentUser, db: Db, session: ReadSession, settings: AppSettings) -> Response:
    return _search(request, settings, "ImagingStudy", lambda s: records.imaging_studies(session, user, s), (db, user))


@router.get("/ImagingStudy/{resource_id}")
def read_imaging_study(resource_id: str, request: Request, user: CurrentUser, db: Db, session: ReadSession) -> Response:
    return _read(request, "ImagingStudy", resource_id, lambda s: records.imaging_studies(session, user, s), (db, user))


@router.get("/DiagnosticReport")
def search_diagnostic_reports(
    request: Request, user: CurrentUser, db: Db, session: ReadSession, settings: AppSettings, card: Card
) -> Response:
    info = _card_info(card)
    return _search(request, settings, "DiagnosticReport", lambda s: records.diagnostic_reports(session, user, s, info), (db, user))


@router.get("/DiagnosticReport/{resource_id}")
def read_diagnostic_report(
    resource_id: str, request: Request, user: CurrentUser, db: Db, session: ReadSession, card: Card
) -> Response:
    info = _card_info(card)
    return _read(request, "DiagnosticReport", resource_id, lambda s: records.diagnostic_reports(session, user, s, info), (db, user))


@router.get("/ServiceRequest")
def search_service_requests(request: Request, user: CurrentUser, db: Db, session: ReadSession, settings: AppSettings) -> Response:
    return _search(request, settings, "ServiceRequest", lambda s: records.service_requests(session, user, s), (db, user))


@router.get("/ServiceRequest/{resource_id}")
def read_service_request(resource_id: str, request: Request, user: CurrentUser, db: Db, session: ReadSession) -> Response:
    return _read(request, "ServiceRequest", resource_id, lambda s: records.service_requests(session, user, s), (db, user))
