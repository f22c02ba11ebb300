"""DICOMweb (PS3.18) under ``/dicomweb``: QIDO-RS search, WADO-RS retrieve, STOW-RS store.

Viewers (OHIF) and PACS (Orthanc's DICOMweb plugin) talk to the server here with the same
access rules as the web app: a session cookie or an API bearer token (``auth.current_user``),
and a station user sees only its own station's studies, in every search and retrieve (an
invisible study is answered 404, like a missing one).

- QIDO-RS (PS3.18 10.6): ``GET /dicomweb/studies``, ``/studies/{study}/series``,
  ``/studies/{study}/series/{series}/instances`` (and ``/series``, ``/instances`` across
  studies); matching, paging and the JSON model are core's (``xray_triage.store.dicomweb_query``).
- WADO-RS (PS3.18 10.4): studies, series and instances as ``multipart/related;
  type="application/dicom"`` (each part the stored file, byte for byte as it was received),
  ``/metadata`` (DICOM JSON read from the stored files, Pixel Data as a BulkDataURI to its
  frames), ``/frames/{list}`` (the stored transfer syntax, or uncompressed) and
  ``/rendered`` (JPEG/PNG through the viewer's pixel pipeline, ``window`` and ``viewport``).
- STOW-RS (PS3.18 10.5): ``POST /dicomweb/studies`` (``multipart/related;
  type="application/dicom"``) goes through the gateway's ``Ingestor`` (same checks,
  durability contract, quarantine and triage) and answers the Store Instances Response
  Module with a FailureReason per refused instance.

Multipart bodies are read with the standard library's ``email`` parser; responses are
written part by part as the files are read (``_multipart``), so a large study streams.
"""

from __future__ import annotations

import email.parser
import email.policy
import io
import logging
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from starlette.concurrency import run_in_threadpool

from consult_web.auth import client_ip
from consult_web.deps import AppSettings, CurrentUser, Db
from consult_web.permissions import visibility_clause
from consult_web.routes.images import _load as load_rendered_image
from xray_triage.pipeline.render import MIN_SIZE, RenderError, render
from xray_triage.store.consult_schema import ROLE_SPECIALIST, ROLE_STATION
from xray_triage.store.dicomweb_query import (
    LEVEL_INSTANCE,
    LEVEL_SERIES,
    LEVEL_STUDY,
    Page,
    QueryError,
    instance_files,
    parse_query,
    search_instances,
    search_series,
    search_studies,
)
from xray_triage.store.ingest import STATUS_CANNOT_UNDERSTAND, STATUS_DATASET_MISMATCH, Ingestor
from xray_triage.store.users import AuthUser

log = logging.getLogger(__name__)
router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])

DICOM_JSON = "application/dicom+json"
CHUNK = 1024 * 1024
NATIVE_SYNTAXES = {ImplicitVRLittleEndian, ExplicitVRLittleEndian}
# The media type of a frame in a compressed transfer syntax (PS3.18 Table 8.7.3-2).
FRAME_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}
# STOW-RS FailureReason (0008,1197) values, PS3.18 Table I.2-1 and PS3.4 Annex B.
FAILURE_PROCESSING = 0x0110
FAILURE_SOP_CLASS_NOT_SUPPORTED = 0x0122
WARNING_COERCED = 0xB000


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/") + router.prefix


def _dicom_json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(payload, status_code=status, media_type=DICOM_JSON, headers=headers)


def _page_response(page: Page, ignored: list[str]) -> JSONResponse:
    """A QIDO-RS answer; Warning headers (PS3.18 8.3.4.1, 8.3.4.4) for ignored keys and more results."""
    warnings = []
    if ignored:
        warnings.append(
            f'299 xray-triage "The fields {",".join(ignored)} are not supported and were ignored"'
        )
    if page.more:
        warnings.append('299 xray-triage "There are additional results that can be requested"')
    return _dicom_json(page.results, headers={"Warning": ", ".join(warnings)} if warnings else None)


def _search(
    request: Request, user: AuthUser, db: Any, settings: Any, level: str, **scope: str
) -> JSONResponse:
    try:
        query = parse_query(
            request.query_params.multi_items(), level, max_limit=settings.dicomweb_max_results
        )
    except QueryError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from exc
    visibility = visibility_clause(user)
    base = _base_url(request)
    try:
        with db.read_session() as session:
            if level == LEVEL_STUDY:
                page = search_studies(session, query, visibility, base_url=base)
            elif level == LEVEL_SERIES:
                page = search_series(session, query, visibility, base_url=base, **scope)
            else:
                page = search_instances(session, query, visibility, base_url=base, **scope)
    except QueryError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from exc
    return _page_response(page, query.ignored)


# --- QIDO-RS ---------------------------------------------------------------------------


@router.get("/studies")
def qido_studies(request: Request, user: CurrentUser, db: Db, settings: AppSettings) -> Response:
    """Search for studies (PS3.18 10.6): ``application/dicom+json``, a list of study objects."""
    return _search(request, user, db, settings, LEVEL_STUDY)


@router.get("/series")
def qido_all_series(request: Request, user: CurrentUser, db: Db, settings: AppSettings) -> Response:
    return _search(request, user, db, settings, LEVEL_SERIES)


@router.get("/instances")
def qido_all_instances(request: Request, user: CurrentUser, db: Db, settings: AppSettings) -> Response:
    return _search(request, user, db, settings, LEVEL_INSTANCE)


@router.get("/studies/{study_uid}/series")
def qido_series(
    study_uid: str, request: Request, user: CurrentUser, db: Db, settings: AppSettings
) -> Response:
    """Search for the series of one study."""
    return _search(request, user, db, settings, LEVEL_SERIES, study_uid=study_uid)


@router.get("/studies/{study_uid}/instances")
def qido_study_instances(
    study_uid: str, request: Request, user: CurrentUser, db: Db, settings: AppSettings
) -> Response:
    return _search(request, user, db, settings, LEVEL_INSTANCE, study_uid=study_uid)


@router.get("/studies/{study_uid}/series/{series_uid}/instances")
def qido_instances(
    study_uid: str, series_uid: str, request: Request, user: CurrentUser, db: Db, settings: AppSettings
) -> Response:
    """Search for the instances of one series (every SOP class, our own results included)."""
    return _search(request, user, db, settings, LEVEL_INSTANCE, study_uid=study_uid, series_uid=series_uid)


# --- WADO-RS ---------------------------------------------------------------------------


def _files(
    db: Any, settings: Any, user: AuthUser, study: str, series: str | None = None, sop: str | None = None
) -> list[tuple[str, str, str, Path]]:
    """The visible stored files a retrieve names (404 when none)."""
    with db.read_session() as session:
        rows = instance_files(session, visibility_clause(user), study, series, sop)
    if not rows:
        raise HTTPException(status_code=404, detail="not found")
    return [(st, se, so, Path(settings.data_dir) / rel) for st, se, so, rel in rows]


def _accept_params(request: Request) -> list[dict[str, str]]:
    """The Accept header as a list of media ranges with their parameters (lower-cased names)."""
    ranges = []
    for item in request.headers.get("accept", "").split(","):
        fields = [f.strip() for f in item.split(";")]
        if not fields[0]:
            continue
        params = {"media": fields[0].lower()}
        for f in fields[1:]:
            name, _, value = f.partition("=")
            params[name.strip().lower()] = value.strip().strip('"')
        ranges.append(params)
    return ranges


def _wanted_syntax(request: Request, part_type: str) -> str | None:
    """The transfer syntax the client asks for parts of ``part_type`` (``*`` = as stored), or
    None when it names none; 406 if the Accept header allows no such part at all."""
    ranges = _accept_params(request)
    if not ranges:
        return None
    for r in ranges:
        media = r["media"]
        if media in ("*/*", "multipart/*") or (
            media == "multipart/related" and r.get("type", part_type).lower() in (part_type, "*/*")
        ):
            return r.get("transfer-syntax")
        if media == part_type:
            return r.get("transfer-syntax")
    raise HTTPException(status_code=406, detail=f'only multipart/related; type="{part_type}" is offered')


def _multipart(parts: Iterator[tuple[str, Iterator[bytes]]], boundary: str) -> Iterator[bytes]:
    """RFC 2387 framing around each (content type, body chunks) part, streamed."""
    for content_type, chunks in parts:
        yield f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode()
        yield from chunks
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def _multipart_response(parts: Iterator[tuple[str, Iterator[bytes]]], part_type: str) -> StreamingResponse:
    boundary = secrets.token_hex(16)
    media = f'multipart/related; type="{part_type}"; boundary={boundary}'
    return StreamingResponse(_multipart(parts, boundary), media_type=media)


def _retrieve(request: Request, files: list[tuple[str, str, str, Path]]) -> StreamingResponse:
    """Instances as stored (PS3.18 10.4.1.1.1); a transfer syntax other than the stored one is 406."""
    wanted = _wanted_syntax(request, "application/dicom")
    stored = {path: _stored_syntax(path) for *_uids, path in files}
    if wanted not in (None, "*") and any(ts != wanted for ts in stored.values()):
        raise HTTPException(
            status_code=406, detail="instances are served in their stored transfer syntax only"
        )

    def parts() -> Iterator[tuple[str, Iterator[bytes]]]:
        for path, ts in stored.items():
            yield f"application/dicom; transfer-syntax={ts}", _file_chunks(path)

    return _multipart_response(parts(), "application/dicom")


def _stored_syntax(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[]).file_meta.TransferSyntaxUID)


@router.get("/studies/{study_uid}")
def wado_study(
    study_uid: str, request: Request, user: CurrentUser, db: Db, settings: AppSettings
) -> Response:
    """All instances of a study, ``multipart/related; type="application/dicom"``."""
    return _retrieve(request, _files(db, settings, user, study_uid))


@router.get("/studies/{study_uid}/series/{series_uid}")
def wado_series(
    study_uid: str, series_uid: str, request: Request, user: CurrentUser, db: Db, settings: AppSettings
) -> Response:
    return _retrieve(request, _files(db, settings, user, study_uid, series_uid))


@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}")
def wado_instance(
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    request: Request,
    user: CurrentUser,
    db: Db,
    settings: AppSettings,
) -> Response:
    """One instance: a one-part ``multipart/related`` answer holding the stored file's bytes."""
    return _retrieve(request, _files(db, settings, user, study_uid, series_uid, sop_uid))


def _instance_metadata(path: Path, base_url: str, study: str, series: str, sop: str) -> dict[str, Any]:
    """A stored file's data set as DICOM JSON (PS3.18 F.2), Pixel Data as a BulkDataURI to its frames."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    data = ds.to_json_dict(bulk_data_threshold=1024 * 1024, bulk_data_element_handler=lambda _e: "")
    data["00083002"] = {
        "vr": "UI",
        "Value": [str(ds.file_meta.TransferSyntaxUID)],
    }  # AvailableTransferSyntaxUID
    if "Rows" in ds:
        frames = ",".join(str(n) for n in range(1, int(ds.get("NumberOfFrames") or 1) + 1))
        vr = (
            "OB" if ds.file_meta.TransferSyntaxUID.is_compressed or ds.get("BitsAllocated", 16) <= 8 else "OW"
        )
        url = f"{base_url}/studies/{study}/series/{series}/instances/{sop}/frames/{frames}"
        data["7FE00010"] = {"vr": vr, "BulkDataURI": url}
    return data


def _metadata(request: Request, files: list[tuple[str, str, str, Path]]) -> JSONResponse:
    base = _base_url(request)
    return _dicom_json([_instance_metadata(path, base, st, se, so) for st, se, so, path in files])


@router.get("/studies/{study_uid}/metadata")
def wado_study_metadata(
    study_uid: str, request: Request, user: CurrentUser, db: Db, settings: AppSettings
) -> Response:
    """The metadata of every instance of a study (PS3.18 10.4.1.1.2)."""
    return _metadata(request, _files(db, settings, user, study_uid))


@router.get("/studies/{study_uid}/series/{series_uid}/metadata")
def wado_series_metadata(
    study_uid: str, series_uid: str, request: Request, user: CurrentUser, db: Db, settings: AppSettings
) -> Response:
    return _metadata(request, _files(db, settings, user, study_uid, series_uid))


@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/metadata")
def wado_instance_metadata(
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    request: Request,
    user: CurrentUser,
    db: Db,
    settings: AppSettings,
) -> Response:
    return _metadata(request, _files(db, settings, user, study_uid, series_uid, sop_uid))


def _frame_numbers(frame_list: str) -> list[int]:
    try:
        numbers = [int(n) for n in frame_list.split(",")]
    except ValueError:
        raise HTTPException(status_code=400, detail="frame numbers are positive integers") from None
    if not numbers or min(numbers) < 1:
        raise HTTPException(status_code=400, detail="frame numbers are positive integers")
    return numbers


def frame_payloads(ds: Dataset, numbers: list[int], *, uncompressed: bool) -> list[tuple[str, bytes]]:
    """(media type, bytes) of the frames ``numbers`` (1-based) of ``ds`` (PS3.18 10.4.1.1.3).

    As stored: native pixel data sliced per frame, or each compressed frame's fragments
    joined. ``uncompressed`` decodes a compressed image with pydicom into little-endian
    native pixels (colour as RGB). Raises IndexError for a frame past the last.
    """
    ts = ds.file_meta.TransferSyntaxUID
    count = int(ds.get("NumberOfFrames") or 1)
    if max(numbers) > count:
        raise IndexError(f"the image has {count} frame(s)")
    native_type = f"application/octet-stream; transfer-syntax={ExplicitVRLittleEndian}"
    if ts in NATIVE_SYNTAXES:
        frame_bytes = (
            int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) // 8
        )
        data = ds.PixelData
        return [(native_type, bytes(data[(n - 1) * frame_bytes : n * frame_bytes])) for n in numbers]
    if uncompressed or not ts.is_encapsulated:
        pixels = ds.pixel_array
        frames = pixels if count > 1 else pixels[np.newaxis]
        return [
            (
                native_type,
                np.ascontiguousarray(frames[n - 1]).astype(frames.dtype.newbyteorder("<")).tobytes(),
            )
            for n in numbers
        ]
    media = FRAME_MEDIA_TYPES.get(str(ts), "application/octet-stream")
    encoded = list(generate_frames(ds.PixelData, number_of_frames=count))
    return [(f"{media}; transfer-syntax={ts}", encoded[n - 1]) for n in numbers]


@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/frames/{frame_list}")
def wado_frames(
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    frame_list: str,
    request: Request,
    user: CurrentUser,
    db: Db,
    settings: AppSettings,
) -> Response:
    """Frames as ``multipart/related``: the stored transfer syntax when the client accepts it
    (``transfer-syntax=*`` or the stored UID), else uncompressed (Explicit VR Little Endian)."""
    numbers = _frame_numbers(frame_list)
    ((_st, _se, _so, path),) = _files(db, settings, user, study_uid, series_uid, sop_uid)
    ds = pydicom.dcmread(path)
    stored = str(ds.file_meta.TransferSyntaxUID)
    wanted = _frame_syntax(request, stored)
    try:
        payloads = frame_payloads(ds, numbers, uncompressed=wanted != stored)
    except IndexError as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from exc
    except Exception as exc:  # a pixel data problem: name the image, not the file
        log.warning("cannot read frames", extra={"sop_uid": sop_uid, "error": f"{type(exc).__name__}: {exc}"})
        raise HTTPException(status_code=422, detail=f"image {sop_uid}: cannot read its frames") from exc
    part_type = (
        "application/octet-stream"
        if wanted != stored or stored in NATIVE_SYNTAXES
        else payloads[0][0].split(";")[0]
    )
    return _multipart_response(iter([(media, iter([data])) for media, data in payloads]), part_type)


def _frame_syntax(request: Request, stored: str) -> str:
    """Which transfer syntax to send frames in: the stored one, or Explicit VR Little Endian."""
    stored_media = FRAME_MEDIA_TYPES.get(stored)
    ranges = _accept_params(request) or [{"media": "*/*"}]
    for r in ranges:
        media, part, syntax = r["media"], r.get("type", "").lower(), r.get("transfer-syntax")
        if media == "multipart/related" and part:
            media = part
        if syntax in ("*", stored):
            return stored
        if media in ("*/*", "multipart/related", "multipart/*"):
            return stored if syntax is None and stored_media is None else str(ExplicitVRLittleEndian)
        if media == "application/octet-stream":
            return str(ExplicitVRLittleEndian) if syntax in (None, str(ExplicitVRLittleEndian)) else _refuse()
        if stored_media is not None and media == stored_media:
            return stored
    return _refuse()


def _refuse() -> str:
    raise HTTPException(
        status_code=406, detail="frames are offered uncompressed or in their stored transfer syntax"
    )


def _viewport_size(viewport: str | None) -> int:
    """``viewport=vw,vh[,...]`` (PS3.18 8.3.5.1.3) as the longest side of the picture."""
    if not viewport:
        return 0
    try:
        width, height = (int(v) for v in viewport.split(",")[:2])
    except ValueError:
        raise HTTPException(status_code=400, detail="viewport is vw,vh") from None
    if width < 1 or height < 1:
        raise HTTPException(status_code=400, detail="viewport sizes are positive")
    return max(width, height)


def _window(window: str | None) -> tuple[float | None, float | None]:
    """``window=center,width,function`` (PS3.18 8.3.5.1.4); only ``linear`` is offered."""
    if not window:
        return None, None
    fields = window.split(",")
    try:
        centre, width = float(fields[0]), float(fields[1])
    except (ValueError, IndexError):
        raise HTTPException(status_code=400, detail="window is center,width,function") from None
    if len(fields) > 2 and fields[2].strip().lower() not in ("linear", ""):
        raise HTTPException(status_code=400, detail="only the linear window function is offered")
    return centre, width


@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/rendered")
def wado_rendered(
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    request: Request,
    user: CurrentUser,
    db: Db,
    settings: AppSettings,
    window: str | None = None,
    viewport: str | None = None,
) -> Response:
    """The instance as JPEG (default) or PNG through the viewer's pixel pipeline (PS3.18 10.4.1.1.4)."""
    _files(db, settings, user, study_uid, series_uid, sop_uid)  # the series must match too
    accept = request.headers.get("accept", "image/jpeg")
    fmt = "png" if "image/png" in accept and "image/jpeg" not in accept else "jpeg"
    if not any(t in accept for t in ("image/jpeg", "image/png", "image/*", "*/*")):
        raise HTTPException(status_code=406, detail="rendered images are image/jpeg or image/png")
    wc, ww = _window(window)
    requested = _viewport_size(viewport)
    image = load_rendered_image(db, settings, user, study_uid, sop_uid, requested or max(MIN_SIZE, 1))
    size = max(requested or max(image.shape), MIN_SIZE)
    try:
        picture = render(image, wc=wc, ww=ww, size=size, fmt=fmt)
    except RenderError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from exc
    return Response(
        picture.data, media_type=picture.media_type, headers={"Cache-Control": "private, max-age=3600"}
    )


# --- STOW-RS ---------------------------------------------------------------------------


def stow_calling_ae(user: AuthUser, settings: Any) -> str:
    """Which station a STOW-RS upload is filed under: a station user's own, else the
    configured ``dicomweb_stow_ae`` (so a station user sees exactly what it uploads)."""
    if user.role == ROLE_STATION:
        return user.station_ae or ""
    return settings.dicomweb_stow_ae


def parse_multipart_related(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """(content type, bytes) of each part of a ``multipart/related`` body (RFC 2387), read
    with the standard library's MIME parser; ValueError when the body is not one."""
    if not content_type.lower().startswith("multipart/related"):
        raise ValueError('a STOW-RS request is multipart/related; type="application/dicom"')
    header = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(header + body)
    if not message.is_multipart():
        raise ValueError("the body has no multipart boundary")
    parts = []
    for part in message.iter_parts():
        payload = part.get_payload(decode=True)
        parts.append((part.get_content_type(), payload if isinstance(payload, bytes) else b""))
    if message.defects or not parts:
        raise ValueError(
            "the multipart body is malformed: " + "; ".join(type(d).__name__ for d in message.defects)
        )
    return parts


def _ref_item(sop_class: str, sop_uid: str, **extra: Any) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class or "1.2.840.10008.5.1.4.1.1.7"  # unknown: Secondary Capture
    item.ReferencedSOPInstanceUID = sop_uid or "0"
    for keyword, value in extra.items():
        setattr(item, keyword, value)
    return item


def store_instances(
    ingestor: Ingestor,
    parts: list[tuple[str, bytes]],
    *,
    calling_ae: str,
    peer: str,
    study_uid: str | None,
    base_url: str,
) -> tuple[int, Dataset]:
    """Ingest each ``application/dicom`` part as the gateway does; returns (HTTP status, the
    Store Instances Response Module, PS3.18 10.5.3): 200 all stored, 202 some refused,
    409 none stored."""
    stored: list[Dataset] = []
    failed: list[Dataset] = []
    warned = False
    for media, payload in parts:
        sop_class = sop_uid = ""
        try:
            if media != "application/dicom":
                raise _Refused(
                    FAILURE_SOP_CLASS_NOT_SUPPORTED, f"a part of type {media} is not application/dicom"
                )
            try:
                ds = pydicom.dcmread(io.BytesIO(payload))
            except Exception as exc:
                raise _Refused(
                    STATUS_CANNOT_UNDERSTAND, f"not a DICOM Part 10 file: {type(exc).__name__}"
                ) from exc
            sop_class, sop_uid = str(ds.get("SOPClassUID", "")), str(ds.get("SOPInstanceUID", ""))
            ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
            if not ts:
                raise _Refused(
                    STATUS_CANNOT_UNDERSTAND, "no Transfer Syntax UID in the file meta information"
                )
            if study_uid is not None and str(ds.get("StudyInstanceUID", "")) != study_uid:
                raise _Refused(
                    STATUS_DATASET_MISMATCH, "the instance belongs to another study than the URL's"
                )
            outcome = ingestor.ingest(
                ds, payload, transfer_syntax_uid=ts, calling_ae=calling_ae, peer_address=peer
            )
            if not outcome.ok:
                raise _Refused(outcome.status, outcome.message)
        except _Refused as refused:
            log.warning(
                "STOW-RS refused an instance",
                extra={
                    "sop_uid": sop_uid,
                    "status": f"0x{refused.status:04X}",
                    "why": refused.why,
                    "calling_ae": calling_ae,
                },
            )
            failed.append(_ref_item(sop_class, sop_uid, FailureReason=refused.status))
            continue
        except Exception:
            log.exception("unexpected error storing a STOW-RS instance", extra={"sop_uid": sop_uid})
            failed.append(_ref_item(sop_class, sop_uid, FailureReason=FAILURE_PROCESSING))
            continue
        log.info(
            "STOW-RS stored" if not outcome.quarantined else "STOW-RS quarantined",
            extra={"sop_uid": sop_uid, "calling_ae": calling_ae, "why": outcome.message},
        )
        if outcome.quarantined:  # stored and kept apart (see /admin): no URL to retrieve it by
            warned = True
            stored.append(_ref_item(sop_class, sop_uid, WarningReason=WARNING_COERCED))
        else:
            url = (
                f"{base_url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{sop_uid}"
            )
            stored.append(_ref_item(sop_class, sop_uid, RetrieveURL=url))
    response = Dataset()
    if study_uid is not None:
        response.RetrieveURL = f"{base_url}/studies/{study_uid}"
    response.ReferencedSOPSequence = stored
    response.FailedSOPSequence = failed
    status = 409 if not stored else 202 if failed or warned else 200
    return status, response


class _Refused(Exception):
    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status
        self.why = why


async def _stow(request: Request, user: AuthUser, settings: Any, study_uid: str | None) -> Response:
    if user.role == ROLE_SPECIALIST:
        raise HTTPException(
            status_code=403, detail="specialists read studies; stations and admins store them"
        )
    calling_ae = stow_calling_ae(user, settings)
    if not calling_ae:
        raise HTTPException(status_code=403, detail="this station user has no station")
    body = await request.body()
    try:
        parts = parse_multipart_related(request.headers.get("content-type", ""), body)
    except ValueError as exc:
        raise HTTPException(
            status_code=415 if "multipart/related" in str(exc)[:40] else 400, detail=str(exc)
        ) from exc
    status, response = await run_in_threadpool(
        store_instances,
        request.app.state.ingestor,
        parts,
        calling_ae=calling_ae,
        peer=client_ip(request),
        study_uid=study_uid,
        base_url=_base_url(request),
    )
    return _dicom_json(response.to_json_dict(), status=status)


@router.post("/studies")
async def stow_studies(request: Request, user: CurrentUser, settings: AppSettings) -> Response:
    """Store instances (PS3.18 10.5), through the gateway's ingest path (then triaged as usual)."""
    return await _stow(request, user, settings, None)


@router.post("/studies/{study_uid}")
async def stow_study(study_uid: str, request: Request, user: CurrentUser, settings: AppSettings) -> Response:
    """Store instances of one study; an instance of another study is refused (0xA900)."""
    return await _stow(request, user, settings, study_uid)
