"""Study Root Query/Retrieve SCP on the gateway's port: C-FIND, C-MOVE, C-GET (PS3.4 Annex C).

Access (the web app's rule, by calling AE title): the association was already admitted
by the gateway's station check (a registered station, or any AE with
``accept_unknown_stations``). Then

* a calling AE title listed in ``qr_all_stations_ae_titles`` (e.g. the hospital PACS,
  registered as a station too) sees every station's studies;
* a registered station sees only the studies it sent (``Study.station_ae``);
* any other calling AE title (one let in by ``accept_unknown_stations``) is refused:
  status 0x0124 "Refused: Not Authorised" (PS3.7 C.5.x), nothing is searched.

A study of another station is simply not found: the answer is the same as for a UID that
does not exist.

C-MOVE destinations are resolved by Move Destination AE title through the delivery
registry (``xray_triage/move_destinations.py``); TLS ones use the senders' client TLS.
C-GET and C-MOVE send each instance as stored (its own transfer syntax, the data set
as received). The C-MOVE sub-association proposes, per SOP class, the stored transfer
syntaxes plus Explicit and Implicit VR Little Endian; a C-GET peer offers its own. When
the peer accepted no context with the stored (compressed) syntax but an uncompressed
one, the image is decompressed with pydicom for that peer only; the stored file is
never changed.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from sqlalchemy import select

from xray_triage.move_destinations import MoveDestination
from xray_triage.store.db import Database
from xray_triage.store.qr_query import (
    QueryError,
    Scope,
    StoredInstance,
    TooManyMatches,
    find,
    instances_to_retrieve,
)
from xray_triage.store.schema import Station

log = logging.getLogger(__name__)

QR_SOP_CLASSES = (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
)

STATUS_PENDING = 0xFF00
STATUS_CANCEL = 0xFE00
STATUS_SUCCESS = 0x0000
STATUS_NOT_AUTHORISED = 0x0124  # PS3.7 C.5.x general status "Refused: Not Authorized"
STATUS_IDENTIFIER_MISMATCH = 0xA900  # Identifier does not match SOP Class
STATUS_OUT_OF_RESOURCES = 0xA700  # C-FIND: Refused: Out of resources
STATUS_UNABLE_TO_PROCESS = 0xC000
STATUS_OUT_OF_RESOURCES_SUBOPS = 0xA702  # C-MOVE/C-GET: unable to perform sub-operations
MAX_SUBOPERATIONS = 65535  # NumberOfRemainingSuboperations is a US


@dataclass(frozen=True)
class QueryRetrieveConfig:
    data_dir: Path
    all_stations_ae_titles: frozenset[str] = frozenset()
    resolve_move_destination: Callable[[str], MoveDestination | None] = lambda _ae: None
    # Client TLS context for destinations marked tls (the delivery senders' settings); None: refused.
    tls_context: Callable[[], ssl.SSLContext] | None = None
    max_matches: int = 5000  # C-FIND: more matches are refused with 0xA700 (narrow the query)


class QueryRetrieveSCP:
    """The three Q/R handlers, bound by :class:`dicom_gateway.scp.DicomGateway`."""

    def __init__(self, config: QueryRetrieveConfig, db: Database) -> None:
        self.config = config
        self.db = db

    def handlers(self) -> list[tuple[Any, Callable[..., Any]]]:
        return [(evt.EVT_C_FIND, self.on_find), (evt.EVT_C_GET, self.on_get), (evt.EVT_C_MOVE, self.on_move)]

    # -- access --------------------------------------------------------------------

    def scope_for(self, calling_ae: str) -> Scope | None:
        """What ``calling_ae`` may see; None = refused (not a registered station)."""
        if calling_ae in self.config.all_stations_ae_titles:
            return Scope(None)
        with self.db.read_session() as session:
            registered = session.scalar(select(Station.id).where(Station.ae_title == calling_ae))
        return Scope(calling_ae) if registered is not None else None

    # -- C-FIND --------------------------------------------------------------------

    def on_find(self, event: evt.Event) -> Iterator[tuple[Any, Dataset | None]]:
        calling_ae = _calling_ae(event.assoc)
        try:
            scope = self.scope_for(calling_ae)
            if scope is None:
                log.warning(
                    "C-FIND refused", extra={"calling_ae": calling_ae, "why": "not a registered station"}
                )
                yield _status(STATUS_NOT_AUTHORISED, "calling AE title may not query"), None
                return
            identifier = event.identifier
            with self.db.read_session() as session:
                matches = list(find(session, identifier, scope, limit=self.config.max_matches))
        except TooManyMatches as exc:
            log.warning("C-FIND refused", extra={"calling_ae": calling_ae, "why": str(exc)})
            yield _status(STATUS_OUT_OF_RESOURCES, str(exc)), None
            return
        except QueryError as exc:
            log.warning("C-FIND refused", extra={"calling_ae": calling_ae, "why": str(exc)})
            yield _status(STATUS_IDENTIFIER_MISMATCH, str(exc)), None
            return
        except Exception as exc:
            log.exception("C-FIND failed", extra={"calling_ae": calling_ae})
            yield _status(STATUS_UNABLE_TO_PROCESS, f"query failed: {type(exc).__name__}"), None
            return
        log.info(
            "C-FIND",
            extra={
                "calling_ae": calling_ae,
                "level": identifier.get("QueryRetrieveLevel", ""),
                "matches": len(matches),
            },
        )
        for match in matches:
            if event.is_cancelled:
                yield STATUS_CANCEL, None
                return
            yield STATUS_PENDING, match
        yield STATUS_SUCCESS, None

    # -- C-GET ---------------------------------------------------------------------

    def on_get(self, event: evt.Event) -> Iterator[Any]:
        calling_ae = _calling_ae(event.assoc)
        found = self._retrieve_list(event, calling_ae, "C-GET")
        if isinstance(found, Dataset):
            yield 1  # pynetdicom needs a count before the failure status
            yield found, None
            return
        yield len(found)
        # The peer is the Storage SCP of these contexts (role selection): we are their SCU.
        accepted = [cx for cx in event.assoc.accepted_contexts if cx.as_scu]
        yield from self._send(found, accepted, event)

    # -- C-MOVE --------------------------------------------------------------------

    def on_move(self, event: evt.Event) -> Iterator[Any]:
        calling_ae = _calling_ae(event.assoc)
        destination_ae = (
            str(event.move_destination, "ascii", "replace")
            if isinstance(event.move_destination, bytes)
            else str(event.move_destination)
        )
        destination_ae = destination_ae.strip()
        try:
            destination = self.config.resolve_move_destination(destination_ae)
        except Exception as exc:  # e.g. the database is unreachable: answered as unknown, logged
            log.error(
                "cannot look up the move destination",
                extra={"move_destination": destination_ae, "error": str(exc)},
            )
            destination = None
        if destination is None:
            log.warning(
                "C-MOVE refused",
                extra={
                    "calling_ae": calling_ae,
                    "move_destination": destination_ae,
                    "why": "unknown move destination",
                },
            )
            yield None, None  # pynetdicom answers 0xA801 Move destination unknown
            return
        tls_args = None
        if destination.tls:
            try:
                if self.config.tls_context is None:
                    raise ValueError("no client TLS configured")
                tls_args = (self.config.tls_context(), destination.host)
            except (OSError, ValueError, ssl.SSLError) as exc:
                log.error(
                    "C-MOVE refused",
                    extra={
                        "calling_ae": calling_ae,
                        "move_destination": destination_ae,
                        "why": f"TLS: {exc}",
                    },
                )
                yield None, None
                return
        found = self._retrieve_list(event, calling_ae, "C-MOVE")
        sop_classes: dict[str, set[str]] = {}
        if not isinstance(found, Dataset):
            for item in found:
                sop_classes.setdefault(item.sop_class_uid, set()).add(item.transfer_syntax_uid)
        captured: list[Any] = []
        kwargs: dict[str, Any] = {
            "contexts": _move_contexts(sop_classes),
            "evt_handlers": [(evt.EVT_ACCEPTED, lambda e: captured.append(e.assoc))],
        }
        if tls_args is not None:
            kwargs["tls_args"] = tls_args
        yield destination.host, destination.port, kwargs
        if isinstance(found, Dataset):
            yield 1
            yield found, None
            return
        log.info(
            "C-MOVE",
            extra={
                "calling_ae": calling_ae,
                "move_destination": destination_ae,
                "destination": destination.name,
                "instances": len(found),
            },
        )
        yield len(found)
        accepted = [cx for cx in (captured[0].accepted_contexts if captured else []) if cx.as_scu]
        yield from self._send(found, accepted, event)

    # -- shared --------------------------------------------------------------------

    def _retrieve_list(self, event: evt.Event, calling_ae: str, what: str) -> list[StoredInstance] | Dataset:
        """The instances to send, or a failure status data set."""
        try:
            scope = self.scope_for(calling_ae)
            if scope is None:
                log.warning(
                    f"{what} refused", extra={"calling_ae": calling_ae, "why": "not a registered station"}
                )
                return _status(STATUS_NOT_AUTHORISED, "calling AE title may not retrieve")
            with self.db.read_session() as session:
                found = instances_to_retrieve(session, event.identifier, scope)
        except QueryError as exc:
            log.warning(f"{what} refused", extra={"calling_ae": calling_ae, "why": str(exc)})
            return _status(STATUS_IDENTIFIER_MISMATCH, str(exc))
        except Exception as exc:
            log.exception(f"{what} failed", extra={"calling_ae": calling_ae})
            return _status(STATUS_UNABLE_TO_PROCESS, f"retrieve failed: {type(exc).__name__}")
        if len(found) > MAX_SUBOPERATIONS:
            return _status(STATUS_OUT_OF_RESOURCES_SUBOPS, f"more than {MAX_SUBOPERATIONS} instances")
        return found

    def _send(
        self, found: list[StoredInstance], accepted: list[Any], event: evt.Event
    ) -> Iterator[tuple[Any, Dataset | None]]:
        for item in found:
            if event.is_cancelled:
                yield STATUS_CANCEL, None
                return
            yield STATUS_PENDING, self._dataset_for(item, accepted)
        yield STATUS_SUCCESS, None

    def _dataset_for(self, item: StoredInstance, accepted: list[Any]) -> Dataset:
        """The stored instance as pydicom reads it, decompressed only when the peer needs it.

        Not re-encoded: pydicom writes elements it did not parse back as their raw bytes,
        so the peer gets the data set as received. A file that cannot be read becomes a
        data set without file meta: pynetdicom then counts that sub-operation as failed
        and lists its SOP Instance UID in Failed SOP Instance UID List.
        """
        try:
            ds = dcmread(self.config.data_dir / item.file_path)
        except (OSError, ValueError) as exc:
            log.error(
                "cannot read a stored instance for retrieve",
                extra={"sop_uid": item.sop_instance_uid, "error": type(exc).__name__},
            )
            return _placeholder(item)
        stored = UID(item.transfer_syntax_uid or str(ds.file_meta.TransferSyntaxUID))
        syntaxes = {str(cx.transfer_syntax[0]) for cx in accepted if cx.abstract_syntax == item.sop_class_uid}
        if stored in syntaxes or not stored.is_compressed:
            return ds  # an exact context, or an uncompressed one pynetdicom converts to
        if syntaxes & {ExplicitVRLittleEndian, ImplicitVRLittleEndian}:
            try:
                # Same instance in another transfer syntax: keep its UID (PS3.5 8.2, lossless change).
                ds.decompress(generate_instance_uid=False)
                log.info(
                    "decompressed for a peer without the stored transfer syntax",
                    extra={"sop_uid": item.sop_instance_uid, "stored": stored.name},
                )
            except Exception as exc:
                log.error(
                    "cannot decompress for retrieve",
                    extra={"sop_uid": item.sop_instance_uid, "error": str(exc)},
                )
                return _placeholder(item)
        return ds


def _move_contexts(sop_classes: dict[str, set[str]]) -> list[Any]:
    """Per SOP class: the stored syntaxes first, then the uncompressed fallbacks (at most 128)."""
    contexts = []
    for sop_class, stored in sorted(sop_classes.items()):
        syntaxes = sorted(s for s in stored if s) + [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        contexts.append(build_context(sop_class, list(dict.fromkeys(syntaxes))))
    return contexts[:128] or [build_context("1.2.840.10008.1.1")]


def _placeholder(item: StoredInstance) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = item.sop_class_uid
    ds.SOPInstanceUID = item.sop_instance_uid
    return ds


def _status(status: int, comment: str) -> Dataset:
    """A status data set with an Error Comment (0000,0902), at most 64 characters."""
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment.encode("ascii", "replace").decode()[:64]
    return ds


def _calling_ae(assoc: Any) -> str:
    return str(assoc.requestor.ae_title).strip()
