"""The DICOM C-ECHO / C-STORE SCP that station X-ray machines send to (pynetdicom).

Association admission (registered calling AE title, optional per-station IP
list) happens on EVT_REQUESTED, before any presentation context is accepted,
so an unknown station gets a proper A-ASSOCIATE-RJ "calling AE title not
recognised"; a request addressed to another called AE title is rejected with
"called AE title not recognised" (pynetdicom's ``require_called_aet``). Each
C-STORE data set is received straight to a file in the data directory
(:mod:`dicom_gateway.receive_to_disk`) and handed to
:class:`xray_triage.store.ingest.Ingestor`, which answers Success only once the file is
fsync'ed and its row committed (group commit: concurrent associations share commits).

DICOM TLS (issue 15): an optional second listener on ``GatewayConfig.tls.port``
(:mod:`dicom_gateway.tls`); both listeners share the gate, the slot table and
the reaper. On EVT_REQUESTED the peer's client certificate must belong to the
calling AE title (:func:`xray_triage.store.station_certs.check_certificate`).

Defences against a hostile or broken network (issue 11):

* connections wait in :mod:`dicom_gateway.connections` until they have sent a
  complete A-ASSOCIATE-RQ (closed when the peer closes, sends garbage, or is
  too slow); accepted sockets get a read timeout;
* :mod:`dicom_gateway.limits` caps associations per calling AE title and per
  address and keeps slots for registered stations;
* a reaper thread cuts the connection of an association that was aborted,
  rejected or never requested but is still open a moment later (its reader
  blocked on a peer that trickles bytes, or its reactor idling until the network
  timeout), and stops its threads;
* a data set larger than ``max_dataset_bytes`` is refused while it arrives: the
  association is aborted (A-ABORT) once the P-DATA of one message exceeds the
  limit, nothing is stored. pynetdicom only lets a C-STORE be answered after
  the whole data set has been received, so a failure status cannot be sent
  without first buffering it all.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import UID
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import Verification

from dicom_gateway import receive_to_disk
from dicom_gateway.connections import GatedAssociationServer, PendingGate, PendingLimits, force_close
from dicom_gateway.limits import SlotLimits, SlotTable
from dicom_gateway.qr import QR_SOP_CLASSES, QueryRetrieveSCP
from dicom_gateway.tls import TlsConfig, peer_certificate, server_context
from xray_triage.store.db import Database
from xray_triage.store.ingest import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_MISMATCH,
    STATUS_OUT_OF_RESOURCES,
    Ingestor,
    IngestOutcome,
)
from xray_triage.store.station_certs import check_certificate
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
# Rejected-transient by the service provider, presentation related, local limit exceeded:
# what pynetdicom itself sends when maximum_associations is reached.
REJECT_TRANSIENT = 0x02
SOURCE_PROVIDER_PRESENTATION = 0x03
REASON_LOCAL_LIMIT_EXCEEDED = 0x02

# After an abort or a reject, how long pynetdicom may take to close the connection
# itself before the reaper cuts it (a peer trickling bytes keeps its reader blocked).
CLOSE_LINGER_S = 2.0
# Room for a command set and PDV headers on top of the largest data set a PDU may carry.
PDU_READ_SLACK = 64 * 1024
REAPER_INTERVAL_S = 0.25
ADOPT_ONLY_HOST = "127.0.0.1"


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
    require_called_ae_title: bool = True
    association_request_timeout_s: float = 5.0
    max_pending_connections: int = 64
    max_pending_per_address: int = 16
    max_associations_per_station: int = 8
    max_associations_per_address: int = 16
    reserved_station_associations: int = 8
    max_dataset_bytes: int = 256 * 1024 * 1024
    tls: TlsConfig | None = None  # DICOM TLS listener on its own port (None: none)
    plain_enabled: bool = True  # False: TLS only, no plain listener on ``port``
    reuse_port: bool = False  # SO_REUSEPORT: other gateway processes listen on the same port(s)
    adopt_only: bool = False  # plain connections only come handed over by the gateway process (a receiver)


class _Listeners:
    """The gateway's listening servers (plain and/or TLS), seen as one: they share the
    gate, the slot table and the reaper, so limits count both ports together."""

    def __init__(self) -> None:
        self.by_kind: dict[str, GatedAssociationServer] = {}

    @property
    def active_associations(self) -> list[object]:
        return [a for server in self.by_kind.values() for a in server.active_associations]

    def shutdown(self) -> None:
        for server in self.by_kind.values():
            server.shutdown()

    def port(self, kind: str) -> int | None:
        server = self.by_kind.get(kind)
        return server.server_address[1] if server else None


class DicomGateway:
    """Owns the pynetdicom AE, its listening server and the reaper thread."""

    def __init__(
        self,
        config: GatewayConfig,
        db: Database,
        ingestor: Ingestor,
        clock: Callable[[], float] = time.monotonic,
        qr: QueryRetrieveSCP | None = None,
    ) -> None:
        self.config = config
        self.qr = qr  # Study Root C-FIND / C-MOVE / C-GET (dicom_gateway/qr.py); None = not offered
        self.db = db
        self.ingestor = ingestor
        self.clock = clock
        self.ae = _make_ae(config, query_retrieve=qr is not None)
        self._server: _Listeners | None = None
        self.tls_context = server_context(config.tls) if config.tls is not None else None
        self._last_activity: dict[int, float] = {}
        self._activity_lock = threading.Lock()
        self.gate = PendingGate(
            PendingLimits(
                request_timeout_s=config.association_request_timeout_s,
                max_pending=config.max_pending_connections,
                max_pending_per_address=config.max_pending_per_address,
                read_timeout_s=config.network_timeout_s,
            ),
            clock=clock,
        )
        self.slots = SlotTable(
            SlotLimits(
                max_associations=config.max_associations,
                per_station=config.max_associations_per_station,
                per_address=config.max_associations_per_address,
                reserved_for_registered=config.reserved_station_associations,
            )
        )
        # Per-association bookkeeping (keys: Association threads), under _track_lock.
        self._track_lock = threading.Lock()
        self._opened: dict[object, float] = {}  # handed over by the gate at
        self._requested: set[object] = set()  # A-ASSOCIATE-RQ seen
        self._closing: dict[object, float] = {}  # aborted / rejected at
        self._cut: set[object] = set()  # connection already cut by the reaper
        self._dataset_bytes: dict[object, int] = {}  # P-DATA data set bytes of the message in progress
        self._oversized: set[object] = set()
        self._reaper_stop = threading.Event()
        self._reaper: threading.Thread | None = None

    @property
    def incoming_dir(self) -> Path:
        """Where C-STORE data sets are received to (renamed into the store from there)."""
        return self.ingestor.data_dir / "incoming"

    @property
    def port(self) -> int:
        """The bound plain port (useful when configured as 0)."""
        bound = self._server.port("plain") if self._server else None
        return bound if bound is not None else self.config.port

    @property
    def tls_port(self) -> int | None:
        """The bound TLS port (None without a TLS listener)."""
        bound = self._server.port("tls") if self._server else None
        if bound is None and self.config.tls is not None:
            return self.config.tls.port
        return bound

    def start(self) -> None:
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_PDU_RECV, self._on_pdu_recv),
            (evt.EVT_DIMSE_RECV, self._on_dimse_recv),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]
        if self.qr is not None:
            handlers += self.qr.handlers()
        # make_server (pynetdicom's documented way to use a custom server class) instead
        # of start_server; the accept loop runs in our own thread, as start_server's does.
        listeners = _Listeners()
        ports = []
        if self.config.plain_enabled:
            # adopt_only: a receiver process serves plain connections the gateway process hands
            # it; its own plain server only listens on a loopback port nobody is told of.
            address = (ADOPT_ONLY_HOST, 0) if self.config.adopt_only else (self.config.host, self.config.port)
            ports.append(("plain", address, None))
        if self.config.tls is not None:
            ports.append(("tls", (self.config.host, self.config.tls.port), self.tls_context))
        try:
            for kind, address, context in ports:
                listeners.by_kind[kind] = self.ae.make_server(
                    address,
                    evt_handlers=handlers,
                    server_class=GatedAssociationServer,
                    gate=self.gate,
                    tls_context=context,
                    reuse_port=self.config.reuse_port,
                )
        except OSError:
            # The other port may be bound already: close it (shutdown() would wait for an
            # accept loop that never started).
            for server in listeners.by_kind.values():
                server.server_close()
            raise
        self._server = listeners
        receive_to_disk.enable(self.incoming_dir)
        for kind, server in listeners.by_kind.items():
            threading.Thread(target=server.serve_forever, name=f"dicom-accept-{kind}", daemon=True).start()
        self._reaper_stop.clear()
        self._reaper = threading.Thread(target=self._reap_loop, name="dicom-reaper", daemon=True)
        self._reaper.start()
        log.info(
            "DICOM gateway listening",
            extra={
                "ae_title": self.config.ae_title,
                "host": self.config.host,
                "port": self.port if self.config.plain_enabled else None,
                "tls_port": self.tls_port,
            },
        )

    def set_handoff(self, handoff: Callable[[object, tuple[str, int]], bool] | None) -> None:
        """Offer each plain-port connection (once its A-ASSOCIATE-RQ has arrived) to ``handoff``,
        which may pass it to another process (``gateway_processes``); TLS connections stay here."""
        server = self._server.by_kind.get("plain") if self._server else None
        if server is not None:
            server.handoff = handoff

    def adopt(self, sock: object, address: tuple[str, int]) -> bool:
        """Serve a plain connection another process accepted; False when there is no plain listener."""
        server = self._server.by_kind.get("plain") if self._server else None
        if server is None:
            return False
        server.adopt(sock, address)  # type: ignore[arg-type]
        return True

    def active_associations(self) -> int:
        return len(self._server.active_associations) if self._server else 0

    def stop(self, grace_s: float) -> None:
        """Stop accepting, let in-flight associations finish for ``grace_s``, abort the rest.

        Ends even when peers trickle bytes: what is still open after the grace period
        gets an A-ABORT, and connections whose reader is blocked are cut
        (pynetdicom's reader threads are not daemons, so one left blocked would keep
        the process alive).
        """
        if self._server is None:
            return
        server = self._server
        # Stop the accept loop and close the listening socket first.
        server.shutdown()  # the pynetdicom server's shutdown aborts nothing by itself
        # Connections that never sent an A-ASSOCIATE-RQ (port probe, stalled client) and
        # associations not yet established have nothing in flight: drop them at once.
        dropped = self.gate.stop()
        for assoc in server.active_associations:
            if not assoc.is_established:
                self._abort(assoc)
        deadline = time.monotonic() + grace_s
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        remaining = server.active_associations
        for assoc in remaining:
            log.warning("aborting association at shutdown", extra={"calling_ae": _calling_ae(assoc)})
            self._abort(assoc)
        cut = self._finish_closing(server)
        self._reaper_stop.set()
        if self._reaper is not None:
            self._reaper.join(timeout=5)
        self._server = None
        receive_to_disk.disable(self.incoming_dir)
        log.info(
            "DICOM gateway stopped",
            extra={"aborted": len(remaining), "pending_dropped": dropped, "connections_cut": cut},
        )

    def _finish_closing(self, server: _Listeners) -> int:
        """Give aborts CLOSE_LINGER_S to leave, then cut what is still blocked; bounded."""
        deadline = time.monotonic() + CLOSE_LINGER_S
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        stuck = server.active_associations
        for assoc in stuck:
            _end(assoc)
        deadline = time.monotonic() + CLOSE_LINGER_S
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        left = server.active_associations
        if left:
            log.error("associations still open after shutdown", extra={"count": len(left)})
        return len(stuck)

    def _abort(self, assoc: object) -> None:
        """A-ABORT without waiting (a blocking abort waits for a reader that may never return)."""
        with self._track_lock:
            self._closing.setdefault(assoc, self.clock())
        try:
            assoc.abort(block=False)  # type: ignore[attr-defined]
        except Exception as exc:  # the connection may be half gone already
            log.debug("abort failed", extra={"error": str(exc)})

    # -- the reaper ----------------------------------------------------------------------

    def _reap_loop(self) -> None:
        while not self._reaper_stop.wait(REAPER_INTERVAL_S):
            try:
                self.reap()
            except Exception:
                log.exception("reaper sweep failed")

    def reap(self) -> int:
        """One sweep: cut connections pynetdicom cannot end by itself; returns how many.

        * an association aborted or rejected CLOSE_LINGER_S ago whose thread still runs
          (its reader is blocked on a peer that trickles bytes);
        * a connection handed over by the gate that has still not produced an
          A-ASSOCIATE-RQ after ``association_request_timeout_s``.
        Also frees slots of associations that ended without an end event, and removes data
        sets received to disk by associations that ended before a handler took them.
        """
        receive_to_disk.discard()
        server = self._server
        if server is None:
            return 0
        now = self.clock()
        live = server.active_associations
        alive = set(live)
        self.slots.prune(alive)
        to_cut = []
        with self._track_lock:
            for assoc in live:
                if assoc in self._cut:
                    continue
                closing = self._closing.get(assoc)
                opened = self._opened.get(assoc)
                if closing is not None and now - closing > CLOSE_LINGER_S:
                    to_cut.append((assoc, "did not close after an abort or reject"))
                elif (
                    assoc not in self._requested
                    and opened is not None
                    and now - opened > self.config.association_request_timeout_s
                ):
                    to_cut.append((assoc, "no A-ASSOCIATE-RQ in time"))
            for assoc, _ in to_cut:
                self._cut.add(assoc)
            for table in (self._opened, self._closing, self._dataset_bytes):
                for key in [k for k in table if k not in alive]:
                    del table[key]
            for table_set in (self._requested, self._cut, self._oversized):
                table_set.intersection_update(alive)
        for assoc, why in to_cut:
            log.warning("cutting a stalled connection", extra={"peer": _peer(assoc), "why": why})
            _end(assoc)
        return len(to_cut)

    # -- event handlers ---------------------------------------------------------------

    def _on_conn_open(self, event: evt.Event) -> None:
        with self._track_lock:
            self._opened[event.assoc] = self.clock()
        _bound_pdu_reads(event.assoc, self.pdu_read_limit)

    @property
    def pdu_read_limit(self) -> int:
        """Largest PDU length (bytes after the 6-byte header) read from a peer.

        pynetdicom reads each PDU whole, whatever length its header declares and
        whatever maximum we advertised, before any event sees it. Nothing longer
        than one data set under ``max_dataset_bytes`` (or than ``max_pdu`` when that
        is set) plus room for a command set can be legitimate.
        """
        bound = self.config.max_dataset_bytes
        if self.config.max_pdu:
            bound = min(bound, self.config.max_pdu)
        return bound + PDU_READ_SLACK

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        with self._track_lock:
            self._requested.add(assoc)
        # At EVT_REQUESTED the requestor's AE titles are only in the A-ASSOCIATE primitive.
        primitive = assoc.requestor.primitive
        calling_ae = str(primitive.calling_ae_title).strip()
        called_ae = str(primitive.called_ae_title).strip()
        peer = assoc.requestor.address
        if self.config.require_called_ae_title and called_ae != self.config.ae_title:
            # pynetdicom (require_called_aet) answers A-ASSOCIATE-RJ "called AE title not recognised".
            log.warning(
                "association rejected",
                extra={
                    "calling_ae": calling_ae,
                    "peer": peer,
                    "why": f"called AE title {called_ae!r} is not ours",
                },
            )
            return
        sock = _raw_socket(assoc)
        over_tls = isinstance(sock, ssl.SSLSocket)
        try:
            with self.db.session() as session:
                decision = admit(
                    session, calling_ae, peer, accept_unknown=self.config.accept_unknown_stations
                )
                cert_problem = (
                    check_certificate(session, calling_ae, over_tls=over_tls, peer=peer_certificate(sock))
                    if decision.accepted
                    else None
                )
        except Exception as exc:  # a DB outage must reject, not crash the association thread
            log.error("station check failed, rejecting", extra={"calling_ae": calling_ae, "error": str(exc)})
            self._reject(assoc, 0x02, REASON_NO_REASON)  # transient: the modality may retry
            return
        if not decision.accepted:
            reason = REASON_CALLING_AE_NOT_RECOGNISED if decision.calling_ae_unknown else REASON_NO_REASON
            log.warning(
                "association rejected", extra={"calling_ae": calling_ae, "peer": peer, "why": decision.reason}
            )
            self._reject(assoc, REJECT_PERMANENT, reason)
            return
        if cert_problem is not None:
            log.warning(
                "association rejected", extra={"calling_ae": calling_ae, "peer": peer, "why": cert_problem}
            )
            self._reject(assoc, REJECT_PERMANENT, REASON_CALLING_AE_NOT_RECOGNISED)
            return
        full = self.slots.try_take(assoc, calling_ae, peer, decision.registered)
        if full is not None:
            log.warning("association rejected", extra={"calling_ae": calling_ae, "peer": peer, "why": full})
            self._reject(assoc, REJECT_TRANSIENT, REASON_LOCAL_LIMIT_EXCEEDED, SOURCE_PROVIDER_PRESENTATION)
            return
        log.info(
            "association requested",
            extra={"calling_ae": calling_ae, "peer": peer, "why": decision.reason, "tls": over_tls},
        )

    def _reject(self, assoc: object, result: int, reason: int, source: int = SOURCE_SERVICE_USER) -> None:
        with self._track_lock:
            self._closing.setdefault(assoc, self.clock())
        _reject(assoc, result, reason, source)

    def _on_accepted(self, event: evt.Event) -> None:
        self._mark_activity(event.assoc)

    def _on_rejected(self, event: evt.Event) -> None:
        # pynetdicom's own rejects (called AE title, its maximum_associations backstop).
        self.slots.release(event.assoc)
        with self._track_lock:
            self._closing.setdefault(event.assoc, self.clock())

    def _on_aborted(self, event: evt.Event) -> None:
        # Also pynetdicom's own abort on network_timeout: if the reader is blocked
        # on a trickling peer, the reaper cuts the connection after CLOSE_LINGER_S.
        with self._track_lock:
            self._closing.setdefault(event.assoc, self.clock())
        self._on_closed(event)

    def _on_closed(self, event: evt.Event) -> None:
        self.slots.release(event.assoc)
        receive_to_disk.discard(getattr(event.assoc, "dul", None))  # a data set cut off mid-transfer
        with self._activity_lock:
            self._last_activity.pop(id(event.assoc), None)

    def _on_pdu_recv(self, event: evt.Event) -> None:
        """Count data set bytes of the DIMSE message in progress; abort past max_dataset_bytes.

        Runs in pynetdicom's reader thread for each PDU, before the fragments are
        appended to the message being assembled, so at most one PDU more than the
        limit is ever buffered.
        """
        pdu = event.pdu
        if not isinstance(pdu, P_DATA_TF):
            return
        # Message control header (PS3.8 E.2): bit 0 set = command fragment.
        size = sum(
            len(item.data) - 1
            for item in pdu.presentation_data_value_items
            if item.data and item.message_control_header_byte[-1] == "0"
        )
        if not size:
            return
        assoc = event.assoc
        with self._track_lock:
            if assoc in self._oversized:
                return
            total = self._dataset_bytes.get(assoc, 0) + size
            self._dataset_bytes[assoc] = total
            over = total > self.config.max_dataset_bytes
            if over:
                self._oversized.add(assoc)
        if over:
            receive_to_disk.discard(getattr(assoc, "dul", None))  # what arrived of it so far goes
            log.warning(
                "data set larger than max_dataset_bytes: association aborted, nothing stored",
                extra={
                    "calling_ae": _calling_ae(assoc),
                    "peer": _peer(assoc),
                    "max_dataset_bytes": self.config.max_dataset_bytes,
                },
            )
            self._abort(assoc)

    def _on_dimse_recv(self, event: evt.Event) -> None:
        with self._track_lock:
            self._dataset_bytes.pop(event.assoc, None)

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
        sop_uid = str(request.AffectedSOPInstanceUID or "")
        try:
            path = event.dataset_path  # received to disk (receive_to_disk)
        except AttributeError:
            path = None  # pynetdicom's in-memory mode (receive_to_disk not enabled)
        if path is not None and (error := receive_to_disk.take(path)) is not None:
            log.error(
                "cannot write the received data set",
                extra={"calling_ae": calling_ae, "sop_uid": sop_uid, "error": str(error)},
            )
            self._mark_activity(assoc)
            return _failure(STATUS_OUT_OF_RESOURCES, f"cannot write file: {error.strerror or error}")
        try:
            if path is not None:
                outcome = self.ingestor.ingest_file(
                    Path(path),
                    transfer_syntax_uid=str(event.context.transfer_syntax),
                    calling_ae=calling_ae,
                    peer_address=assoc.requestor.address,
                    receive_ms=receive_ms,
                    sop_class_uid=str(request.AffectedSOPClassUID or ""),
                    sop_instance_uid=sop_uid,
                )
            else:
                outcome = self._ingest_in_memory(event, calling_ae, receive_ms)
        except Exception as exc:
            log.exception("unexpected error storing instance", extra={"sop_uid": sop_uid})
            return _failure(STATUS_OUT_OF_RESOURCES, f"internal error: {exc}")
        finally:
            self._mark_activity(assoc)
        fields = {
            "calling_ae": calling_ae,
            "sop_uid": sop_uid,
            "status": f"0x{outcome.status:04X}",
            "why": outcome.message,
        }
        if outcome.ok:
            log.info("C-STORE stored" if not outcome.duplicate else "C-STORE duplicate", extra=fields)
            return outcome.status
        log.warning("C-STORE refused", extra=fields)
        return _failure(outcome.status, outcome.message)

    def _ingest_in_memory(self, event: evt.Event, calling_ae: str, receive_ms: float) -> IngestOutcome:
        """The C-STORE data set as pynetdicom holds it in memory (not received to disk)."""
        request = event.request
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            encoded = event.encoded_dataset(include_meta=True)
        except Exception as exc:
            log.warning("cannot decode dataset", extra={"calling_ae": calling_ae, "error": str(exc)})
            return IngestOutcome(STATUS_CANNOT_UNDERSTAND, f"cannot decode dataset: {exc}")
        if str(ds.get("SOPInstanceUID", "")) != str(request.AffectedSOPInstanceUID or ""):
            return IngestOutcome(
                STATUS_DATASET_MISMATCH, "SOP Instance UID in the dataset differs from the C-STORE request"
            )
        if str(ds.get("SOPClassUID", "")) != str(request.AffectedSOPClassUID):
            return IngestOutcome(
                STATUS_DATASET_MISMATCH, "SOP Class UID in the dataset differs from the C-STORE request"
            )
        return self.ingestor.ingest(
            ds,
            encoded,
            transfer_syntax_uid=str(event.context.transfer_syntax),
            calling_ae=calling_ae,
            peer_address=event.assoc.requestor.address,
            receive_ms=receive_ms,
        )


def _reject(assoc: object, result: int, reason: int, source: int = SOURCE_SERVICE_USER) -> None:
    """Send A-ASSOCIATE-RJ and wait for it to leave, as pynetdicom does for its own rejects
    (without the wait the socket can close first and the peer sees an abort). A peer
    that never closes is cut by the reaper."""
    assoc.acse.send_reject(result, source, reason)  # type: ignore[attr-defined]
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


class PduTooLong(OSError):
    """A peer declared a PDU longer than the gateway reads; the connection is closed."""


def _bound_pdu_reads(assoc: object, limit: int) -> None:
    """Make the association's socket refuse to read a PDU longer than ``limit``.

    pynetdicom's reader asks its :class:`~pynetdicom.transport.AssociationSocket`
    for the 6-byte PDU header, then for exactly the declared length. Refusing that
    second ``recv`` with an OSError is what pynetdicom treats as a broken connection
    (Evt17: the connection is closed and the association ends), before a single
    byte of the body is buffered. No PDU is parsed here.
    """
    wrapper = getattr(getattr(assoc, "dul", None), "socket", None)
    if wrapper is None:
        return
    read = wrapper.recv

    def bounded_recv(nr_bytes: int) -> bytearray:
        if nr_bytes > limit:
            log.warning(
                "peer declared a PDU over the limit: connection closed, nothing stored",
                extra={"peer": _peer(assoc), "pdu_bytes": nr_bytes, "limit": limit},
            )
            raise PduTooLong(f"PDU of {nr_bytes} bytes is over the {limit}-byte limit")
        return read(nr_bytes)

    wrapper.recv = bounded_recv


def _end(assoc: object) -> None:
    """Cut the connection and stop the association's threads.

    Shutting the socket down wakes a reader blocked in ``recv``; ``kill()`` then
    stops the association's reactor, which after an abort of ours would otherwise
    idle until pynetdicom's network timeout. ``kill()`` waits for the reader, so it
    runs in a short-lived daemon thread.
    """
    force_close(_raw_socket(assoc))  # type: ignore[arg-type]
    threading.Thread(target=assoc.kill, name="dicom-kill", daemon=True).start()  # type: ignore[attr-defined]


def _peer(assoc: object) -> str:
    try:
        return str(assoc.requestor.address)  # type: ignore[attr-defined]
    except Exception:
        return "?"


def _raw_socket(assoc: object) -> object | None:
    """The TCP socket under an association (None once pynetdicom has closed it)."""
    wrapper = getattr(getattr(assoc, "dul", None), "socket", None)
    return getattr(wrapper, "socket", None)


def _make_ae(config: GatewayConfig, query_retrieve: bool = False) -> AE:
    ae = AE(ae_title=config.ae_title)
    # Our SlotTable enforces max_associations on admitted associations. pynetdicom's own
    # limit counts every Association thread, also those being rejected or torn down, so a
    # burst of refused requests would make it turn stations away: it stays as a backstop.
    ae.maximum_associations = config.max_associations * 4
    ae.require_called_aet = config.require_called_ae_title
    ae.acse_timeout = config.acse_timeout_s
    ae.dimse_timeout = config.dimse_timeout_s
    ae.network_timeout = config.network_timeout_s
    ae.maximum_pdu_size = config.max_pdu
    ae.add_supported_context(Verification)
    for sop_class in QR_SOP_CLASSES if query_retrieve else ():
        ae.add_supported_context(sop_class, UNCOMPRESSED_TRANSFER_SYNTAXES)
    # Role selection accepted as proposed: a C-GET peer proposes to be the Storage SCP
    # (PS3.4 C.4.3, PS3.7 D.3.3.4); a station that proposes none keeps the default roles.
    roles = {"scu_role": True, "scp_role": True} if query_retrieve else {}
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(
            context.abstract_syntax, transfer_syntaxes_for(context.abstract_syntax), **roles
        )
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
