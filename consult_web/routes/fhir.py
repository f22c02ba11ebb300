"""FHIR R4 (read-only search) under ``/fhir``: ImagingStudy, DiagnosticReport, ServiceRequest.

Same login as the rest of the app: the session cookie or an API bearer token
(``Authorization: Bearer xrt_...``). A station user sees only its station's studies and
what hangs off them. Answers are ``application/fhir+json``: a ``searchset`` Bundle for
a search, a resource for a read (``/fhir/<Type>/<id>``), an OperationOutcome for an error
(400 bad search, 401 not logged in, 404 unknown or invisible resource). Resources are
built and validated by core (``xray_triage/fhir``); this module only parses the request
and serializes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import Response

from consult_web.deps import AppSettings, Card, CurrentUser, ReadSession
from xray_triage.fhir import records
from xray_triage.fhir.resources import coding_from_dicom, operation_outcome, searchset
from xray_triage.fhir.search import Search, SearchError, parse
from xray_triage.inference.card import ModelCard

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


def _search(
    request: Request,
    settings: Any,
    kind: str,
    run: Callable[[Search], records.Page],
    extra: list[tuple[str, str]] | None = None,
) -> Response:
    params = list(request.query_params.multi_items()) + (extra or [])
    try:
        search = parse(params, DEFAULT_COUNT, settings.fhir_max_count)
    except SearchError as exc:
        return outcome(400, "invalid", str(exc))
    page = run(search)
    base = _base(request)
    self_url = f"{base}/{kind}" + (f"?{request.url.query}" if request.url.query else "")
    next_url = None
    if search.offset + len(page.resources) < page.total:
        kept = [(k, v) for k, v in request.query_params.multi_items() if k != "_offset"]
        next_url = f"{base}/{kind}?" + urlencode([*kept, ("_offset", str(search.offset + search.count))])
    return fhir_response(searchset(page.resources, page.total, self_url, base, next_url))


def _read(request: Request, settings: Any, kind: str, resource_id: str, run: Callable[[Search], records.Page]) -> Response:
    page = run(Search(ids=[resource_id], count=1))
    if not page.resources:
        return outcome(404, "not-found", f"{kind}/{resource_id} not found")
    return fhir_response(page.resources[0])


@router.get("/ImagingStudy")
def search_imaging_studies(request: Request, user: CurrentUser, session: ReadSession, settings: AppSettings) -> Response:
    return _search(request, settings, "ImagingStudy", lambda s: records.imaging_studies(session, user, s))


@router.get("/ImagingStudy/{resource_id}")
def read_imaging_study(resource_id: str, request: Request, user: CurrentUser, session: ReadSession, settings: AppSettings) -> Response:
    return _read(request, settings, "ImagingStudy", resource_id, lambda s: records.imaging_studies(session, user, s))


@router.get("/DiagnosticReport")
def search_diagnostic_reports(
    request: Request, user: CurrentUser, session: ReadSession, settings: AppSettings, card: Card
) -> Response:
    info = _card_info(card)
    return _search(request, settings, "DiagnosticReport", lambda s: records.diagnostic_reports(session, user, s, info))


@router.get("/DiagnosticReport/{resource_id}")
def read_diagnostic_report(
    resource_id: str, request: Request, user: CurrentUser, session: ReadSession, settings: AppSettings, card: Card
) -> Response:
    info = _card_info(card)
    return _read(request, settings, "DiagnosticReport", resource_id, lambda s: records.diagnostic_reports(session, user, s, info))


@router.get("/ServiceRequest")
def search_service_requests(request: Request, user: CurrentUser, session: ReadSession, settings: AppSettings) -> Response:
    return _search(request, settings, "ServiceRequest", lambda s: records.service_requests(session, user, s))


@router.get("/ServiceRequest/{resource_id}")
def read_service_request(resource_id: str, request: Request, user: CurrentUser, session: ReadSession, settings: AppSettings) -> Response:
    return _read(request, settings, "ServiceRequest", resource_id, lambda s: records.service_requests(session, user, s))
