"""One association to a peer: C-STORE a batch of stored objects (PS3.4 Annex B, Storage Service Class SCU).

For each SOP class of the batch two presentation contexts are proposed: one with the transfer
syntax the object is stored in (when it is compressed) and one with Explicit and Implicit VR
Little Endian. An object goes out as stored when the peer accepted its transfer syntax;
otherwise a compressed object is decompressed with pydicom (pylibjpeg, openjpeg, RLE plugins)
and sent uncompressed; pynetdicom converts between the uncompressed syntaxes itself.

Statuses (PS3.4 B.2.3): Success 0x0000 and the warnings 0xB000 (coercion of data elements),
0xB007 (data set does not match SOP class) and 0xB006 (elements discarded) mean the peer
stored the object; anything else (0xA7xx out of resources, 0xA9xx, 0xCxxx, an unknown code) is a
failure of that object, retried later. A peer that cannot be reached, rejects or aborts the
association, or answers nothing within the DIMSE timeout raises ``PeerUnavailable``.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from xray_triage.store.deliveries import DueObject

log = logging.getLogger(__name__)

UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
STORED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1-255


class PeerUnavailable(RuntimeError):
    """The association could not be made or was lost; the message says why (no paths).

    ``in_flight``: the object whose C-STORE got no answer (None when no association was made).
    """

    def __init__(self, message: str, in_flight: DueObject | None = None) -> None:
        super().__init__(message)
        self.in_flight = in_flight


@dataclass(frozen=True)
class Peer:
    """Where to send: ``ae_title`` at ``host``:``port``; ``tls``: an SSL context (TLS 1.2+) or None."""

    name: str
    ae_title: str
    host: str
    port: int
    calling_ae_title: str
    timeout_s: float = 30.0
    tls: ssl.SSLContext | None = None


OnSent = Callable[[DueObject, int], None]
OnFailed = Callable[[DueObject, str], None]
BeforeSend = Callable[[DueObject], None]


def contexts_for(objects: Sequence[DueObject]) -> list[tuple[str, list[str]]]:
    """The presentation contexts to propose: (SOP class, transfer syntaxes), at most ``MAX_CONTEXTS``."""
    contexts: list[tuple[str, list[str]]] = []
    seen: set[tuple[str, str]] = set()
    for obj in objects:
        if not obj.sop_class_uid:
            continue
        stored = obj.transfer_syntax_uid or ImplicitVRLittleEndian
        wanted: list[tuple[str, list[str]]] = []
        if stored not in UNCOMPRESSED:
            wanted.append((stored, [stored]))
        wanted.append(("uncompressed", list(UNCOMPRESSED)))
        for key, syntaxes in wanted:
            if (obj.sop_class_uid, key) not in seen and len(contexts) < MAX_CONTEXTS:
                seen.add((obj.sop_class_uid, key))
                contexts.append((obj.sop_class_uid, syntaxes))
    return contexts


def send_batch(
    peer: Peer,
    objects: Sequence[DueObject],
    data_dir: Path,
    *,
    on_sent: OnSent,
    on_failed: OnFailed,
    before_send: BeforeSend | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> None:
    """Send ``objects`` over one association, reporting each outcome as it comes.

    ``before_send`` is called before each object (the rate limit waits there). Objects whose file
    is gone are reported failed without a send. Raises ``PeerUnavailable`` when the association
    fails; the object in flight (``in_flight``) is then not reported: the caller backs off both the
    peer and that object, so an object that makes the peer abort every time does not hold up the
    others forever.
    """
    sendable = [o for o in objects if o.file_path and o.sop_class_uid]
    for obj in objects:
        if obj not in sendable:
            on_failed(obj, f"object {obj.sop_instance_uid} is not in the store")
    if not sendable:
        return
    ae = AE(ae_title=peer.calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = peer.timeout_s
    ae.connection_timeout = peer.timeout_s
    for sop_class, syntaxes in contexts_for(sendable):
        ae.add_requested_context(sop_class, syntaxes)
    tls_args = (peer.tls, peer.host) if peer.tls is not None else None
    with _ConnectErrors() as errors:
        try:
            assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args)
        except (OSError, ssl.SSLError) as exc:
            raise PeerUnavailable(f"cannot connect to {peer.host}:{peer.port}: {exc}") from exc
    if not assoc.is_established:
        where = f"{peer.ae_title} at {peer.host}:{peer.port}"
        connect_error = errors.of(assoc)
        if connect_error:
            why = f"cannot be connected to: {connect_error}"
        elif assoc.is_rejected:
            why = "rejected the association"
            if assoc.acceptor.primitive is not None:
                why += f" ({assoc.acceptor.primitive.result_str}, {assoc.acceptor.primitive.reason_str})"
        elif assoc.is_aborted:
            why = "aborted the association request"
        else:
            why = "cannot be connected to (connection refused or timed out)"
        raise PeerUnavailable(f"{where} {why}")
    try:
        accepted = _accepted(assoc)
        for obj in sendable:
            if before_send is not None:
                before_send(obj)  # the rate limit's wait (cut short by a stop)
            if should_stop():
                break  # this object and the rest stay due
            _send_one(assoc, accepted, obj, data_dir, on_sent, on_failed)
    finally:
        if assoc.is_established:
            assoc.release()


class _ConnectErrors(logging.Handler):
    """pynetdicom logs why a connection failed (refused, timeout, TLS handshake) instead of raising:
    collect those records while associating, to name the reason in ``last_error``."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []
        self._logger = logging.getLogger("pynetdicom.transport")

    def __enter__(self) -> _ConnectErrors:
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._logger.removeHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def of(self, assoc) -> str:  # type: ignore[no-untyped-def]
        """Why this association's connection failed, as pynetdicom logged it from the association's
        DUL thread (which connects); other senders may associate at the same time."""
        threads = {assoc.ident, getattr(getattr(assoc, "dul", None), "ident", None)} - {None}
        prefix = "TCP Initialisation Error: "
        for record in self.records:
            message = record.getMessage()
            if record.thread in threads and message.startswith(prefix):
                return message[len(prefix) :]
        return ""


def _accepted(assoc) -> dict[str, set[str]]:  # type: ignore[no-untyped-def]
    accepted: dict[str, set[str]] = {}
    for cx in assoc.accepted_contexts:
        accepted.setdefault(str(cx.abstract_syntax), set()).add(str(cx.transfer_syntax[0]))
    return accepted


def _send_one(assoc, accepted, obj, data_dir, on_sent, on_failed) -> None:  # type: ignore[no-untyped-def]
    syntaxes = accepted.get(str(obj.sop_class_uid), set())
    stored = str(obj.transfer_syntax_uid or ImplicitVRLittleEndian)
    if not syntaxes:
        on_failed(obj, f"peer accepted no transfer syntax for SOP class {obj.sop_class_uid}")
        return
    try:
        ds = pydicom.dcmread(Path(data_dir) / obj.file_path)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        on_failed(obj, f"object {obj.sop_instance_uid} cannot be read from the store: {type(exc).__name__}")
        return
    if stored not in syntaxes and UID(stored).is_compressed:
        try:
            # To Explicit VR Little Endian (pynetdicom re-encodes it as accepted), keeping the SOP
            # Instance UID: it is the same image, and the peer keys re-sends on it.
            ds.decompress(generate_instance_uid=False)
        except Exception as exc:  # noqa: BLE001 - any codec failure: this object fails, the batch goes on
            on_failed(obj, f"peer refused {stored} and object {obj.sop_instance_uid} cannot be decompressed: {exc}")
            return
    try:
        status = assoc.send_c_store(ds)
    except (ValueError, AttributeError, RuntimeError) as exc:  # no matching context, or encoding failed
        on_failed(obj, f"object {obj.sop_instance_uid} cannot be sent: {exc}")
        return
    if not status or "Status" not in status:
        raise PeerUnavailable(
            f"no C-STORE response for {obj.sop_instance_uid} (association aborted or timed out)", in_flight=obj
        )
    code = int(status.Status)
    if code in STORED_STATUSES:
        on_sent(obj, code)
    else:
        comment = str(status.get("ErrorComment", "") or "")
        on_failed(obj, f"peer answered C-STORE status 0x{code:04X}" + (f": {comment}" if comment else ""))
