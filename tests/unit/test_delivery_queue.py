"""The durable delivery queue and its sender (``xray_triage/store/deliveries.py``, ``dicom_sender/``).

Real SQLite, instances stored through the real ``Ingestor``, the real ``delivery`` outbox
consumer, and a real pynetdicom storage SCP in this process as the peer (its handler answers
the statuses a test lists, e.g. 0xA700 and then Success). Time comes from an injected clock,
so back-off is tested without waiting.
"""

from __future__ import annotations

import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation
from sqlalchemy import select, update
from web_helpers import WebEnv, make_web_env, store_dicom

from dicom_sender.rate import RateLimiter
from dicom_sender.service import DestinationSender, SenderConfig
from xray_triage.outbox_consumer import OutboxConsumer
from xray_triage.store import deliveries, outbox
from xray_triage.store.delivery_schema import DELIVERY_PENDING, DELIVERY_SENT, Delivery, Destination
from xray_triage.store.destinations import (
    DestinationError,
    DestinationSpec,
    add_destination,
    destination_states,
    parse_send,
    remove_destination,
    retry_destination,
    sync_configured,
)
from xray_triage.store.schema import Study

DX = "dev_01_dx_pa_explicit_window.dcm"
JPEG_LS = "dev_04_cr_pa_rescale_jpegls.dcm"
# The injected clock's start: rows queued by ``_consume`` take the real time (the column default), so
# T0 must lie after any real "now" for them to be due. It was 2026-11-30 08:00 UTC, which stopped
# being in the future at 08:00 on that day and failed every sending test from then on.
T0 = datetime(2100, 1, 1, 8, 0, tzinfo=UTC)
INITIAL_S, MAX_S = 5.0, 40.0


class FakeClock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class Peer:
    """A pynetdicom storage SCP: answers C-STOREs with ``statuses`` in turn (then Success); aborts
    the association on a C-STORE of any SOP Instance UID in ``abort_on``."""

    port: int
    statuses: list[int]
    abort_on: set[str] = field(default_factory=set)
    received: list[pydicom.Dataset] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: Any = None

    def stop(self) -> None:
        """Shut the SCP down: what a PACS going down looks like (the port refuses connections)."""
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def handle(self, event: evt.Event) -> int:
        if str(event.request.AffectedSOPInstanceUID) in self.abort_on:
            event.assoc.abort()
            return 0xA700
        with self.lock:
            status = self.statuses.pop(0) if self.statuses else 0x0000
            if status == 0x0000:
                ds = event.dataset
                ds.file_meta = event.file_meta
                self.received.append(ds)
            return status

    def sop_uids(self) -> list[str]:
        return [str(ds.SOPInstanceUID) for ds in self.received]


@pytest.fixture
def scp() -> Iterator[Callable[..., Peer]]:
    peers: list[Peer] = []

    def start(
        statuses: list[int] | None = None,
        syntaxes: list[str] | None = None,
        port: int = 0,
        abort_on: set[str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> Peer:
        ae = AE(ae_title="TESTPACS")
        ae.require_called_aet = True  # an association addressed to another AE title is rejected
        for sop_class in (DigitalXRayImageStorageForPresentation, ComputedRadiographyImageStorage):
            ae.add_supported_context(sop_class, syntaxes or [ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless])
        peer = Peer(port, list(statuses or []), set(abort_on or ()))
        server = ae.start_server(
            ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, peer.handle)], ssl_context=ssl_context
        )
        peer.port = server.socket.getsockname()[1]
        peer.server = server
        peers.append(peer)
        return peer

    yield start
    for peer in peers:
        peer.stop()


@pytest.fixture
def env(tmp_path: Path) -> WebEnv:
    return make_web_env(tmp_path)


def _add(env: WebEnv, name: str, port: int, send: tuple[str, ...] = ("images",), ae: str = "TESTPACS", **kwargs) -> int:  # type: ignore[no-untyped-def]
    with env.db.session() as session:
        return add_destination(session, DestinationSpec(name, ae, "127.0.0.1", port, send, **kwargs)).id


def _consume(env: WebEnv) -> int:
    return OutboxConsumer(env.db, "delivery", lambda session, stored: deliveries.enqueue(session, stored)).drain()


def _rows(env: WebEnv, destination_id: int | None = None) -> list[Delivery]:
    with env.db.read_session() as session:
        query = select(Delivery).order_by(Delivery.id)
        if destination_id is not None:
            query = query.where(Delivery.destination_id == destination_id)
        rows = list(session.scalars(query))
        session.expunge_all()  # plain objects after the read transaction ends
        return rows


def _sender(env: WebEnv, destination_id: int, clock: FakeClock, **tls: Path) -> DestinationSender:
    config = SenderConfig(
        env.data_dir, "XRAY_TRIAGE", INITIAL_S, MAX_S, batch_size=10, poll_s=0.1, timeout_s=10,
        tls_ca_file=tls.get("ca"),
    )  # fmt: skip
    return DestinationSender(env.db, destination_id, config, clock)


# -- back-off and rate ------------------------------------------------------------------------


def test_backoff_doubles_per_failure_and_is_capped() -> None:
    assert [deliveries.backoff_s(n, 5, 40) for n in range(6)] == [0, 5, 10, 20, 40, 40]
    assert deliveries.backoff_s(10_000, 5, 300) == 300  # no overflow after days of failures


def test_rate_limiter_spaces_sends_at_the_configured_bytes_per_second() -> None:
    t = [0.0]
    limiter = RateLimiter(1000, clock=lambda: t[0])
    assert limiter.delay_for(1000) == 0  # one second's worth is there at once
    assert limiter.delay_for(500) == pytest.approx(0.5)
    t[0] += 0.5
    assert limiter.delay_for(1000) == pytest.approx(1.0)
    t[0] += 10  # idle: the bucket refills to one second's worth only, no burst
    assert limiter.delay_for(2000) == pytest.approx(1.0)


# -- queueing ----------------------------------------------------------------------------------


def test_each_stored_image_is_queued_once_per_destination_that_wants_images(env: WebEnv, shared_dicom: Path) -> None:
    images = _add(env, "pacs", 104)
    results_only = _add(env, "ai-archive", 104, ("ai-results",))
    _study, sop = store_dicom(env, shared_dicom / DX, "STATION1")
    assert _consume(env) == 1
    rows = _rows(env)
    assert [(r.destination_id, r.sop_instance_uid, r.category, r.state) for r in rows] == [
        (images, sop, "images", DELIVERY_PENDING)
    ]
    assert not _rows(env, results_only)
    # A crash before the consumer's commit repeats its events: nothing is queued twice.
    with env.db.session() as session:
        for stored in outbox.read_after(session, 0)[0]:
            assert deliveries.enqueue(session, stored) == 0
    assert len(_rows(env)) == 1


def test_due_rows_come_urgent_study_first_then_oldest(env: WebEnv, shared_dicom: Path) -> None:
    destination = _add(env, "pacs", 104)
    stored = [store_dicom(env, shared_dicom / DX, "STATION1") for _ in range(3)]
    _consume(env)
    urgent_study = stored[2][0]
    with env.db.session() as session:
        session.execute(update(Study).where(Study.study_instance_uid == urgent_study).values(priority="urgent", priority_rank=3))
    with env.db.read_session() as session:
        order = [d.sop_instance_uid for d in deliveries.due(session, destination, T0 + timedelta(days=1), 10)]
    assert order == [stored[2][1], stored[0][1], stored[1][1]]


# -- sending -----------------------------------------------------------------------------------


def test_a_refused_object_is_retried_after_its_backoff_and_sent_once(env: WebEnv, shared_dicom: Path, scp) -> None:  # type: ignore[no-untyped-def]
    peer = scp(statuses=[0xA700])  # out of resources, then Success
    destination = _add(env, "pacs", peer.port)
    _study, sop = store_dicom(env, shared_dicom / DX, "STATION1")
    _consume(env)
    clock = FakeClock()
    sender = _sender(env, destination, clock)

    assert sender.run_once() == 1
    [row] = _rows(env)
    assert (row.state, row.attempts, row.next_attempt_at) == (DELIVERY_PENDING, 1, T0 + timedelta(seconds=INITIAL_S))
    assert "0xA700" in row.last_error and peer.received == []
    with env.db.read_session() as session:
        [state] = destination_states(session, failing_degraded_s=60, now=T0)
    assert (state["state"], state["queued"], state["failed"], state["sent"]) == ("failing", 1, 1, 0)

    clock.advance(INITIAL_S - 1)
    assert sender.run_once() == 0  # not due yet: nothing sent
    clock.advance(1)
    assert sender.run_once() == 1
    [row] = _rows(env)
    assert (row.state, row.attempts, row.sent_status) == (DELIVERY_SENT, 2, 0)
    assert peer.sop_uids() == [sop]
    assert sender.run_once() == 0  # sent: never again
    assert peer.sop_uids() == [sop]
    with env.db.read_session() as session:
        [state] = destination_states(session, failing_degraded_s=60, now=clock())
    assert (state["state"], state["queued"], state["sent"], state["last_success_at"]) == ("ok", 0, 1, clock().isoformat())


def test_a_peer_that_is_down_is_backed_off_then_gets_everything_once_it_is_up(
    env: WebEnv, shared_dicom: Path, scp  # type: ignore[no-untyped-def]
) -> None:
    probe = scp()
    port = probe.port
    probe.stop()  # the PACS is down: nothing listens on the destination's port
    destination = _add(env, "pacs", port)
    sops = [store_dicom(env, shared_dicom / DX, "STATION1")[1] for _ in range(2)]
    _consume(env)
    clock = FakeClock()
    sender = _sender(env, destination, clock)
    sender.run_once()
    sender.run_once()
    with env.db.read_session() as session:
        d = session.get(Destination, destination)
        assert d.consecutive_failures == 1 and d.next_attempt_at == T0 + timedelta(seconds=INITIAL_S)
        assert "cannot be connected to" in d.last_error and "refused" in d.last_error
        assert deliveries.due(session, destination, clock(), 10) == []  # the peer is backed off
        [state] = destination_states(session, failing_degraded_s=60, now=T0 + timedelta(seconds=61))
    assert state["state"] == "degraded" and state["queued"] == 2
    clock.advance(INITIAL_S)
    sender.run_once()
    with env.db.read_session() as session:
        d = session.get(Destination, destination)
        assert d.consecutive_failures == 2 and d.next_attempt_at == clock() + timedelta(seconds=2 * INITIAL_S)
    peer = scp(port=port)  # the PACS is back
    clock.advance(2 * INITIAL_S)
    assert sender.run_once() == 2
    assert sorted(peer.sop_uids()) == sorted(sops)
    assert all(r.state == DELIVERY_SENT for r in _rows(env))


def test_a_peer_that_rejects_the_association_is_backed_off_with_its_reason(env: WebEnv, shared_dicom: Path, scp) -> None:  # type: ignore[no-untyped-def]
    peer = scp()
    destination = _add(env, "pacs", peer.port, ae="NOT_THE_PACS")
    store_dicom(env, shared_dicom / DX, "STATION1")
    _consume(env)
    _sender(env, destination, FakeClock()).run_once()
    with env.db.read_session() as session:
        d = session.get(Destination, destination)
        assert "rejected the association" in d.last_error and "Called AE" in d.last_error, d.last_error
        assert d.next_attempt_at == T0 + timedelta(seconds=INITIAL_S)
    assert peer.received == [] and [r.state for r in _rows(env)] == [DELIVERY_PENDING]


def test_an_object_the_peer_aborts_on_does_not_hold_up_the_others(env: WebEnv, shared_dicom: Path, scp) -> None:  # type: ignore[no-untyped-def]
    stored = [store_dicom(env, shared_dicom / DX, "STATION1")[1] for _ in range(2)]
    poison, other = stored
    peer = scp(abort_on={poison})
    destination = _add(env, "pacs", peer.port)
    _consume(env)
    clock = FakeClock()
    sender = _sender(env, destination, clock)
    sender.run_once()  # the first in line makes the peer abort
    rows = {r.sop_instance_uid: r for r in _rows(env)}
    assert rows[poison].attempts == 1 and "no C-STORE response" in rows[poison].last_error
    assert rows[other].attempts == 0 and peer.received == []
    for _ in range(3):  # the peer's back-off passes: the other object goes first now, and arrives
        clock.advance(MAX_S)
        sender.run_once()
    assert peer.sop_uids() == [other]
    rows = {r.sop_instance_uid: r for r in _rows(env)}
    assert rows[other].state == DELIVERY_SENT and rows[poison].state == DELIVERY_PENDING  # never given up


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (its own CA) and its key, made with the openssl command."""
    cert, key = directory / "peer.pem", directory / "peer.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-pacs",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def test_a_tls_destination_is_reached_over_tls_and_its_certificate_is_checked(
    env: WebEnv, shared_dicom: Path, scp, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    cert, key = _self_signed(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    peer = scp(ssl_context=server_context)
    destination = _add(env, "pacs", peer.port, tls=True)
    _study, sop = store_dicom(env, shared_dicom / DX, "STATION1")
    _consume(env)
    untrusted = _sender(env, destination, FakeClock())  # the system CAs do not know this peer
    untrusted.run_once()
    with env.db.read_session() as session:
        assert "CERTIFICATE_VERIFY_FAILED" in (session.get(Destination, destination).last_error or "")
    assert peer.received == []
    clock = FakeClock(T0 + timedelta(days=1))
    _sender(env, destination, clock, ca=tmp_path / "missing-ca.pem").run_once()  # a typo in the settings
    with env.db.read_session() as session:
        assert "TLS settings (delivery_tls_*) unusable" in (session.get(Destination, destination).last_error or "")
    clock.advance(MAX_S)
    assert _sender(env, destination, clock, ca=cert).run_once() == 1
    assert peer.sop_uids() == [sop]


def test_a_compressed_image_goes_uncompressed_when_the_peer_refuses_its_transfer_syntax(
    env: WebEnv, shared_dicom: Path, scp  # type: ignore[no-untyped-def]
) -> None:
    peer = scp(syntaxes=[ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    destination = _add(env, "pacs", peer.port)
    _study, sop = store_dicom(env, shared_dicom / JPEG_LS, "STATION1")
    _consume(env)
    assert _sender(env, destination, FakeClock()).run_once() == 1
    [received] = peer.received
    assert str(received.SOPInstanceUID) == sop
    assert received.file_meta.TransferSyntaxUID in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    original = pydicom.dcmread(shared_dicom / JPEG_LS)
    assert np.array_equal(received.pixel_array, original.pixel_array)  # lossless: the same pixels


def test_a_compressed_image_goes_as_stored_when_the_peer_accepts_it(env: WebEnv, shared_dicom: Path, scp) -> None:  # type: ignore[no-untyped-def]
    peer = scp()
    destination = _add(env, "pacs", peer.port)
    store_dicom(env, shared_dicom / JPEG_LS, "STATION1")
    _consume(env)
    assert _sender(env, destination, FakeClock()).run_once() == 1
    assert peer.received[0].file_meta.TransferSyntaxUID == JPEGLSLossless


# -- destinations ------------------------------------------------------------------------------


def test_destinations_are_checked_and_removing_one_drops_its_queue(env: WebEnv, shared_dicom: Path) -> None:
    destination = _add(env, "pacs", 104)
    with env.db.session() as session, pytest.raises(DestinationError, match="already exists"):
        add_destination(session, DestinationSpec("pacs", "X", "h", 104, ("images",)))
    with env.db.session() as session, pytest.raises(DestinationError, match="unknown 'pictures'"):
        add_destination(session, DestinationSpec("other", "X", "h", 104, ("pictures",)))
    with pytest.raises(DestinationError, match="empty list"):
        parse_send(" , ")
    assert parse_send("none") == ()  # a C-MOVE destination only: nothing is pushed to it
    with env.db.session() as session:
        add_destination(session, DestinationSpec("mover", "MOVER", "h", 105, parse_send("none")))
    store_dicom(env, shared_dicom / DX, "STATION1")
    _consume(env)
    with env.db.session() as session:
        assert retry_destination(session, "pacs") == 1
        assert remove_destination(session, "pacs")
    assert _rows(env, destination) == []


def test_configured_destinations_follow_the_toml_tables(env: WebEnv) -> None:
    spec = DestinationSpec("pacs", "ORTHANC", "10.0.0.9", 4242, ("images", "ai-results"))
    with env.db.session() as session:
        sync_configured(session, [spec])
    with env.db.session() as session:
        sync_configured(session, [DestinationSpec("pacs", "ORTHANC", "10.0.0.9", 4243, ("images",))])
        with pytest.raises(DestinationError, match="configuration file"):
            remove_destination(session, "pacs")
    with env.db.read_session() as session:
        [state] = destination_states(session, failing_degraded_s=60)
    assert (state["port"], state["send"], state["source"]) == (4243, ["images"], "config")
    with env.db.session() as session:
        sync_configured(session, [])
    with env.db.read_session() as session:
        assert destination_states(session, failing_degraded_s=60) == []


def test_the_delivery_consumer_wakes_the_senders_once_its_rows_are_committed(env: WebEnv, shared_dicom: Path) -> None:
    from xray_triage_server.delivery import DeliveryRuntime

    _add(env, "pacs", 104)
    delivery = DeliveryRuntime(env.settings, env.db)
    pending_when_woken: list[int] = []

    def wake() -> None:  # what a sender sees when woken: the rows must already be committed
        with env.db.read_session() as session:
            pending_when_woken.append(deliveries.pending_count(session))

    delivery.service.wake = wake  # type: ignore[method-assign]
    store_dicom(env, shared_dicom / DX, "STATION1")
    assert delivery.consumer.run_once() == 1
    assert pending_when_woken == [1]
    assert delivery.consumer.run_once() == 0 and pending_when_woken == [1]  # nothing new: no wake
