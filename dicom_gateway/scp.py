"""The DICOM C-ECHO / C-STORE SCP that station X-ray machines send to (pynetdicom).

Association admission (registered calling AE title, optional per-station IP
list) happens on EVT_REQUESTED, before any presentation context is accepted,
so an unknown station gets a proper A-ASSOCIATE-RJ "calling AE title not
recognised". Each C-STORE is handed to :class:`xray_triage.store.ingest.Ingestor`,
which answers Success only once the file is fsync'ed and its row committed.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from pydicom.uid import UID
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from xray_triage.store.db import Database
from xray_triage.store.ingest import STATUS_CANNOT_UNDERSTAND, STATUS_OUT_OF_RESOURCES, Ingestor
from xray_triage.store.stations import admit

log = logging.getLogger(__name__)

# What a CR/DX station may send. Big endian is retired and not offered.
ACCEPTED_TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 (Lossless Only)
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K (Lossless Only)
    "1.2.840.10008.1.2.4.202",  # HTJ2K (Lossless RPCL)
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.5",  # RLE Lossless
]

UNCOMPRESSED_TRANSFER_SYNTAXES = ACCEPTED_TRANSFER_SYNTAXES[:3]

# Reject reasons, PS3.8 9.3.4: result 1 = rejected-permanent, source 1 = service user.
REJECT_PERMANENT = 0x01
SOURCE_SERVICE_USER = 0x01
REASON_NO_REASON = 0x01
REASON_CALLING_AE_NOT_RECOGNISED = 0x03


@dataclass(frozen=True)
class GatewayConfig:
    ae_title: str
    host: str
    port: int
    accept_unknown_stations: bool
    max_associations: int
    acse_timeout_s: float
    dimse_timeout_s: float
    network_timeout_s: float
    max_pdu: int


class DicomGateway:
    """Owns the pynetdicom AE and its listening server."""

    def __init__(self, config: GatewayConfig, db: Database, ingestor: Ingestor) -> None:
        self.config = config
        self.db = db
        self.ingestor = ingestor
        self.ae = _make_ae(config)
        self._server = None
        self._last_activity: dict[int, float] = {}
        self._activity_lock = threading.Lock()

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        return self._server.server_address[1] if self._server else self.config.port

    def start(self) -> None:
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
        ]
        self._server = self.ae.start_server(
            (self.config.host, self.config.port), block=False, evt_handlers=handlers
        )
        log.info(
            "DICOM gateway listening",
            extra={"ae_title": self.config.ae_title, "host": self.config.host, "port": self.port},
        )

    def active_associations(self) -> int:
        return len(self._server.active_associations) if self._server else 0

    def stop(self, grace_s: float) -> None:
        """Stop accepting, let in-flight associations finish for ``grace_s``, abort the rest."""
        if self._server is None:
            return
        server = self._server
        # Stop the accept loop and close the listening socket first.
        server.shutdown()  # the pynetdicom server's shutdown aborts nothing by itself
        # A connection that never sent an A-ASSOCIATE-RQ (port probe, stalled client) has
        # nothing in flight: drop it at once instead of waiting out the grace period.
        for assoc in server.active_associations:
            if not assoc.is_established:
                assoc.abort()
        deadline = time.monotonic() + grace_s
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        remaining = server.active_associations
        for assoc in remaining:
            log.warning("aborting association at shutdown", extra={"calling_ae": _calling_ae(assoc)})
            assoc.abort()
        self._server = None
        log.info("DICOM gateway stopped", extra={"aborted": len(remaining)})

    # -- event handlers ---------------------------------------------------------------

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        # At EVT_REQUESTED the requestor's AE title is only in the A-ASSOCIATE primitive.
        calling_ae = str(assoc.requestor.primitive.calling_ae_title).strip()
        peer = assoc.requestor.address
        try:
            with self.db.session() as session:
                decision = admit(session, calling_ae, peer, accept_unknown=self.config.accept_unknown_stations)
        except Exception as exc:  # a DB outage must reject, not crash the association thread
            log.error("station check failed, rejecting", extra={"calling_ae": calling_ae, "error": str(exc)})
            _reject(assoc, 0x02, REASON_NO_REASON)  # transient: the modality may retry
            return
        if decision.accepted:
            log.info("association requested", extra={"calling_ae": calling_ae, "peer": peer, "why": decision.reason})
            return
        reason = REASON_CALLING_AE_NOT_RECOGNISED if decision.calling_ae_unknown else REASON_NO_REASON
        log.warning("association rejected", extra={"calling_ae": calling_ae, "peer": peer, "why": decision.reason})
        _reject(assoc, REJECT_PERMANENT, reason)

    def _on_accepted(self, event: evt.Event) -> None:
        self._mark_activity(event.assoc)

    def _on_closed(self, event: evt.Event) -> None:
        with self._activity_lock:
            self._last_activity.pop(id(event.assoc), None)

    def _mark_activity(self, assoc: object) -> float:
        now = time.perf_counter()
        with self._activity_lock:
            previous = self._last_activity.get(id(assoc), now)
            self._last_activity[id(assoc)] = now
        return previous

    def _on_echo(self, event: evt.Event) -> int:
        return 0x0000

    def _on_store(self, event: evt.Event) -> int | tuple[int, object]:
        assoc = event.assoc
        calling_ae = _calling_ae(assoc)
        # Receive time: from association accept / previous response to a complete dataset.
        receive_ms = round((time.perf_counter() - self._mark_activity(assoc)) * 1000, 2)
        request = event.request
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            encoded = event.encoded_dataset(include_meta=True)
        except Exception as exc:
            log.warning("cannot decode dataset", extra={"calling_ae": calling_ae, "error": str(exc)})
            return _failure(STATUS_CANNOT_UNDERSTAND, f"cannot decode dataset: {exc}")
        sop_uid = str(request.AffectedSOPInstanceUID or "")
        if str(ds.get("SOPInstanceUID", "")) != sop_uid:
            return _failure(0xA900, "SOP Instance UID in the dataset differs from the C-STORE request")
        if str(ds.get("SOPClassUID", "")) != str(request.AffectedSOPClassUID):
            return _failure(0xA900, "SOP Class UID in the dataset differs from the C-STORE request")
        try:
            outcome = self.ingestor.ingest(
                ds,
                encoded,
                transfer_syntax_uid=str(event.context.transfer_syntax),
                calling_ae=calling_ae,
                peer_address=assoc.requestor.address,
                receive_ms=receive_ms,
            )
        except Exception as exc:
            log.exception("unexpected error storing instance", extra={"sop_uid": sop_uid})
            return _failure(STATUS_OUT_OF_RESOURCES, f"internal error: {exc}")
        finally:
            self._mark_activity(assoc)
        fields = {"calling_ae": calling_ae, "sop_uid": sop_uid, "status": f"0x{outcome.status:04X}", "why": outcome.message}
        if outcome.ok:
            log.info("C-STORE stored" if not outcome.duplicate else "C-STORE duplicate", extra=fields)
            return outcome.status
        log.warning("C-STORE refused", extra=fields)
        return _failure(outcome.status, outcome.message)


def _reject(assoc: object, result: int, reason: int) -> None:
    """Send A-ASSOCIATE-RJ and wait for it to leave, as pynetdicom does for its own rejects
    (without the wait the socket can close first and the peer sees an abort)."""
    assoc.acse.send_reject(result, SOURCE_SERVICE_USER, reason)  # type: ignore[attr-defined]
    assoc.kill()  # type: ignore[attr-defined]


def _failure(status: int, comment: str) -> tuple[int, object]:
    """A failure status with an Error Comment (0000,0902), at most 64 characters."""
    from pydicom.dataset import Dataset

    status_ds = Dataset()
    status_ds.Status = status
    status_ds.ErrorComment = comment.encode("ascii", "replace").decode()[:64]
    return status_ds  # type: ignore[return-value]


def _calling_ae(assoc: object) -> str:
    return str(assoc.requestor.ae_title).strip()  # type: ignore[attr-defined]


def _make_ae(config: GatewayConfig) -> AE:
    ae = AE(ae_title=config.ae_title)
    ae.maximum_associations = config.max_associations
    ae.acse_timeout = config.acse_timeout_s
    ae.dimse_timeout = config.dimse_timeout_s
    ae.network_timeout = config.network_timeout_s
    ae.maximum_pdu_size = config.max_pdu
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, transfer_syntaxes_for(context.abstract_syntax))
    return ae


def transfer_syntaxes_for(sop_class_uid: str) -> list[str]:
    """Image classes get every codec; the others (reports, presentation states, RT
    plans...) carry no compressed pixels and get the uncompressed syntaxes only.

    Why not all codecs for everything: pynetdicom copies every supported context for
    each new association, and 170 classes x 15 syntaxes made association set-up
    measurably slower (tens of ms) than with this split.
    """
    if "Image" in UID(sop_class_uid).name:
        return ACCEPTED_TRANSFER_SYNTAXES
    return UNCOMPRESSED_TRANSFER_SYNTAXES
