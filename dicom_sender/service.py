"""The senders: one thread per destination working off its queue (``xray_triage/store/deliveries.py``).

Each sender takes up to ``batch_size`` due objects (urgent studies first), sends them over one
association (``scu.send_batch``) and commits each outcome as soon as the peer answers, so a
kill -9 loses at most the answer of the object in flight (sent again after the restart: the
peer keys on its SOP Instance UID, so the repeat is harmless). A failed object or an unreachable
peer is retried after an exponential back-off, without limit of time.

A supervisor thread starts a sender for each destination in the database (and stops those of
removed ones) every ``poll_s``, so ``xray-triage destinations add`` takes effect in a running
server. ``wake()`` (called after the ``delivery`` consumer commits new rows) makes every sender
look at once; otherwise each sleeps until its next row is due, at most ``poll_s``.
``stop()`` lets the object in flight finish (or time out) and leaves the rest queued.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from dicom_sender.rate import RateLimiter
from dicom_sender.scu import Peer, PeerUnavailable, send_batch
from xray_triage.store import deliveries
from xray_triage.store.db import Database
from xray_triage.store.delivery_schema import Destination

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class SenderConfig:
    """What the senders need of the settings (``xray_triage/settings.py``, ``delivery_*``)."""

    data_dir: Path
    calling_ae_title: str
    retry_initial_s: float = 5.0
    retry_max_s: float = 300.0
    batch_size: int = 50
    poll_s: float = 2.0
    timeout_s: float = 30.0
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None


def tls_context(config: SenderConfig) -> ssl.SSLContext:
    """A client context (TLS 1.2+, server certificate and host name checked) for ``tls`` destinations:
    ``tls_ca_file`` (default: the system CAs) and, when given, our certificate for mutual TLS."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=config.tls_ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if config.tls_cert_file is not None:
        context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
    return context


class DestinationSender:
    """Works off one destination's queue; ``run_once`` is one batch (tests call it directly)."""

    def __init__(self, db: Database, destination_id: int, config: SenderConfig, clock: Clock = utc_now) -> None:
        self.db = db
        self.destination_id = destination_id
        self.config = config
        self.clock = clock
        self.stop_event = threading.Event()
        self.wake_event = threading.Event()
        self._limiter: RateLimiter | None = None
        self._thread: threading.Thread | None = None

    def _peer(self) -> tuple[Peer, int | None] | None:
        with self.db.read_session() as session:
            d = session.get(Destination, self.destination_id)
            if d is None:
                return None
            tls = tls_context(self.config) if d.tls else None
            peer = Peer(d.name, d.ae_title, d.host, d.port, self.config.calling_ae_title, self.config.timeout_s, tls)
            return peer, d.rate_limit_bytes_per_s

    def run_once(self) -> int:
        """Send one batch of due objects; returns how many were tried (0: nothing due)."""
        try:
            found = self._peer()
        except (OSError, ssl.SSLError) as exc:  # unreadable CA file or client certificate
            self._peer_failed(f"TLS settings (delivery_tls_*) unusable: {exc}")
            return 0
        if found is None:
            return 0
        peer, rate = found
        if rate is None:
            self._limiter = None
        elif self._limiter is None or self._limiter.bytes_per_s != rate:
            self._limiter = RateLimiter(rate)
        with self.db.read_session() as session:
            batch = deliveries.due(session, self.destination_id, self.clock(), self.config.batch_size)
        if not batch:
            return 0
        tried = 0

        def on_sent(obj: deliveries.DueObject, status: int) -> None:
            nonlocal tried
            tried += 1
            with self.db.session() as session:
                deliveries.mark_sent(session, obj.delivery_id, status, self.clock())
            log.info(
                "sent to destination",
                extra={"destination": peer.name, "sop_uid": obj.sop_instance_uid, "status": f"0x{status:04X}"},
            )

        def on_failed(obj: deliveries.DueObject, error: str) -> None:
            nonlocal tried
            tried += 1
            with self.db.session() as session:
                when = deliveries.mark_failed(
                    session, obj.delivery_id, error, self.clock(),
                    initial_s=self.config.retry_initial_s, max_s=self.config.retry_max_s,
                )  # fmt: skip
            log.warning(
                "send to destination failed; will retry",
                extra={"destination": peer.name, "sop_uid": obj.sop_instance_uid, "error": error, "retry_at": str(when)},
            )

        limiter = self._limiter
        before = (lambda obj: limiter.take(obj.file_size, self.stop_event)) if limiter is not None else None
        try:
            send_batch(
                peer, batch, self.config.data_dir, on_sent=on_sent, on_failed=on_failed,
                before_send=before, should_stop=self.stop_event.is_set,
            )  # fmt: skip
        except PeerUnavailable as exc:
            if exc.in_flight is not None:  # it may be what the peer chokes on: let the others pass
                with self.db.session() as session:
                    deliveries.mark_failed(
                        session, exc.in_flight.delivery_id, str(exc), self.clock(),
                        initial_s=self.config.retry_initial_s, max_s=self.config.retry_max_s, peer_error=False,
                    )  # fmt: skip
            self._peer_failed(str(exc))
            return max(tried, 1)
        return tried

    def _peer_failed(self, error: str) -> None:
        with self.db.session() as session:
            when = deliveries.peer_failed(
                session, self.destination_id, error, self.clock(),
                initial_s=self.config.retry_initial_s, max_s=self.config.retry_max_s,
            )  # fmt: skip
        log.warning(
            "destination unavailable; will retry",
            extra={"destination_id": self.destination_id, "error": error, "retry_at": str(when)},
        )

    def _wait_s(self) -> float:
        with self.db.read_session() as session:
            next_at = deliveries.next_due_at(session, self.destination_id)
        if next_at is None:
            return self.config.poll_s
        return min(self.config.poll_s, max(0.0, (next_at - self.clock()).total_seconds()))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"sender-{self.destination_id}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.wake_event.set()

    def join(self, timeout_s: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self.stop_event.is_set():
            try:
                if self.run_once():
                    continue
                wait_s = self._wait_s()
            except Exception:
                log.exception("sender failed; retrying", extra={"destination_id": self.destination_id})
                wait_s = self.config.poll_s
            self.wake_event.wait(wait_s)
            self.wake_event.clear()


class DeliveryService:
    """The senders of every destination, kept in step with the ``destinations`` table."""

    def __init__(self, db: Database, config: SenderConfig, clock: Clock = utc_now) -> None:
        self.db = db
        self.config = config
        self.clock = clock
        self._senders: dict[int, DestinationSender] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def wake(self) -> None:
        """New rows may be due: every sender looks now (cheap; safe from any thread)."""
        for sender in list(self._senders.values()):
            sender.wake_event.set()

    def reconcile(self) -> None:
        """Start senders of new destinations, stop those of removed ones."""
        with self.db.read_session() as session:
            wanted = set(deliveries.destination_ids(session))
        for destination_id in wanted - self._senders.keys():
            sender = DestinationSender(self.db, destination_id, self.config, self.clock)
            self._senders[destination_id] = sender
            sender.start()
            log.info("destination sender started", extra={"destination_id": destination_id})
        for destination_id in self._senders.keys() - wanted:
            self._senders.pop(destination_id).stop()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="delivery-supervisor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.reconcile()
            except Exception:
                log.exception("delivery supervisor failed; retrying")
            self._stop.wait(self.config.poll_s)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop every sender; the object in flight finishes (or times out), the rest stays queued."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        senders = list(self._senders.values())
        for sender in senders:
            sender.stop()
        deadline = time.monotonic() + timeout_s
        for sender in senders:
            sender.join(max(0.1, deadline - time.monotonic()))
