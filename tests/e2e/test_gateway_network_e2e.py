"""End to end: the gateway under a hostile or broken network (issue 11, items 1, 2, 3, 5).

A real ``xray-triage serve`` with small limits and timeouts set through
``XRAY_TRIAGE_*`` variables; floods come from raw sockets and pynetdicom SCUs on
127.0.0.1, bounded in count and time; the legitimate sender is dcmtk ``storescu``.
Outcomes are asserted (the station's store succeeded, the server closed the
flooding connections, every slot is free again, the process exited), never
durations: the waits below are upper bounds so a broken server fails instead of
hanging.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e_helpers import (
    SHARED_DICOM,
    STATION1,
    Server,
    assert_store_consistent,
    copy_with_new_uids,
    counts_for_sop,
    echoscu,
    own_error_lines,
    read_uids,
    store_ok,
    storescu,
)

pytestmark = pytest.mark.slow

FLOODER = "STATION2"
OTHER_STATION = "STATION3"
MAX_ASSOCIATIONS = 4
PER_STATION = 2
SMALL_FILE = SHARED_DICOM / "dev_06_dx_pa_j2k_lossless.dcm"  # 0.84 MB
LARGE_FILE = SHARED_DICOM / "dev_01_dx_pa_explicit_window.dcm"  # 2.1 MB
MAX_DATASET_BYTES = 1_500_000  # between the two

FLOOD_ENV = {
    "XRAY_TRIAGE_MAX_ASSOCIATIONS": str(MAX_ASSOCIATIONS),
    "XRAY_TRIAGE_MAX_ASSOCIATIONS_PER_STATION": str(PER_STATION),
    "XRAY_TRIAGE_RESERVED_STATION_ASSOCIATIONS": "1",
    "XRAY_TRIAGE_ASSOCIATION_REQUEST_TIMEOUT_S": "2",
    "XRAY_TRIAGE_MAX_PENDING_CONNECTIONS": "16",
    "XRAY_TRIAGE_MAX_PENDING_PER_ADDRESS": "8",
    "XRAY_TRIAGE_NETWORK_TIMEOUT_S": "3",
    "XRAY_TRIAGE_MAX_DATASET_BYTES": str(MAX_DATASET_BYTES),
    "XRAY_TRIAGE_SHUTDOWN_GRACE_S": "1",
}
# Upper bounds for conditions to become true (not expectations of speed).
CLOSE_DEADLINE_S = 25.0
DRIP_INTERVAL_S = 0.3  # well under every timeout: only whole-PDU / shutdown limits can end a drip
DRIP_MAX_ROUNDS = 400  # the drip stops by itself after ~2 minutes at most


@pytest.fixture(scope="module")
def server(module_launcher: Any, tmp_path_factory: pytest.TempPathFactory) -> Server:
    srv = module_launcher.launch(
        "gateway-net",
        env=FLOOD_ENV,
        stations=[(FLOODER, "Flooder", None), (OTHER_STATION, "Other", None)],
    )
    # One image stored and triaged first, so the threads the model runtime starts on first
    # use are part of the baseline that every flood test must come back to.
    warm = copy_with_new_uids([SMALL_FILE], tmp_path_factory.mktemp("warm-up"))[0]
    store_ok([warm], srv.dicom_port)
    srv.wait_final([read_uids(warm).study])
    srv.baseline_threads = settled_thread_count(srv)  # type: ignore[attr-defined]
    return srv


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Path]:
    """A copy of the small file with new UIDs, so each store is a new instance."""
    yield copy_with_new_uids([SMALL_FILE], tmp_path)[0]


# -- helpers -----------------------------------------------------------------------------


def open_association(port: int, aet: str, *, network_timeout: float = 120) -> Any:
    """A pynetdicom SCU association (Verification only); the caller releases it."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = 30
    ae.network_timeout = network_timeout
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title="XRAY_TRIAGE")


def release_all(assocs: list[Any]) -> None:
    for assoc in assocs:
        if assoc.is_established:
            assoc.release()
        elif assoc.is_alive():
            assoc.abort()


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed this connection (EOF or reset)."""
    ready, _, _ = select.select([sock], [], [], 0)
    if not ready:
        return False
    try:
        while True:
            data = sock.recv(65536, socket.MSG_DONTWAIT)
            if not data:
                return True
    except BlockingIOError:
        return False  # it sent something (an A-ABORT?) but has not closed yet
    except OSError:
        return True


def wait_all_closed(socks: list[socket.socket], deadline_s: float = CLOSE_DEADLINE_S) -> list[socket.socket]:
    """Poll until the server has closed every socket; returns those still open at the deadline."""
    open_ = list(socks)
    deadline = time.monotonic() + deadline_s
    while open_ and time.monotonic() < deadline:
        open_ = [s for s in open_ if not closed_by_server(s)]
        time.sleep(0.1)
    return open_


class Drip:
    """Send one byte to each socket every DRIP_INTERVAL_S (slowloris); stops by itself."""

    def __init__(self, socks: list[socket.socket]) -> None:
        self.socks = list(socks)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for _ in range(DRIP_MAX_ROUNDS):
            if self.stop.wait(DRIP_INTERVAL_S) or not self.socks:
                return
            for sock in list(self.socks):
                try:
                    sock.send(b"\x00")
                except OSError:
                    self.socks.remove(sock)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def declared_pdu(pdu_type: int, length: int) -> bytes:
    """A PDU header (PS3.8 9.3.1: type, reserved, 4-byte length) promising ``length`` bytes."""
    return bytes([pdu_type, 0]) + length.to_bytes(4, "big")


def server_threads(server: Server) -> int:
    assert server.proc is not None
    return len(os.listdir(f"/proc/{server.proc.pid}/task"))


def settled_thread_count(server: Server) -> int:
    """The server's thread count once it has stopped changing for a second (bounded)."""
    last, stable_since, deadline = server_threads(server), time.monotonic(), time.monotonic() + CLOSE_DEADLINE_S
    while time.monotonic() < deadline and time.monotonic() - stable_since < 1.0:
        time.sleep(0.1)
        now = server_threads(server)
        if now != last:
            last, stable_since = now, time.monotonic()
    return last


def assert_all_slots_free(server: Server) -> None:
    """Every one of the MAX_ASSOCIATIONS slots can be taken again, and no connection of the
    flood left a thread behind: the server comes back to its thread count from before."""
    baseline = server.baseline_threads  # type: ignore[attr-defined]
    deadline = time.monotonic() + CLOSE_DEADLINE_S
    while server_threads(server) > baseline and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server_threads(server) <= baseline, f"{server_threads(server)} threads, {baseline} before the flood"
    aets = [STATION1, STATION1, OTHER_STATION, OTHER_STATION][:MAX_ASSOCIATIONS]
    assocs = [open_association(server.dicom_port, aet) for aet in aets]
    try:
        assert [a.is_established for a in assocs] == [True] * MAX_ASSOCIATIONS
    finally:
        release_all(assocs)


def assert_stored(server: Server, path: Path) -> None:
    assert counts_for_sop(server.data_dir, read_uids(path).sop)[0] == 1


# -- item 1: association slots -------------------------------------------------------------


def test_garbage_then_close_flood_frees_slots(server: Server, fresh: Path) -> None:
    junk = [
        b"GET / HTTP/1.0\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello start
        declared_pdu(0x01, 400) + b"\x00\x01",  # an A-ASSOCIATE-RQ cut short
        b"\x07\x00",  # half a header
        b"\xff" * 64,
    ]
    for n in range(40):
        with socket.create_connection(("127.0.0.1", server.dicom_port), timeout=10) as sock:
            sock.sendall(junk[n % len(junk)])
    store_ok([fresh], server.dicom_port)
    assert_stored(server, fresh)
    assert_all_slots_free(server)


def test_idle_tcp_flood_does_not_shut_stations_out(server: Server, fresh: Path) -> None:
    socks = []
    try:
        for _ in range(200):
            socks.append(socket.create_connection(("127.0.0.1", server.dicom_port), timeout=10))
        store_ok([fresh], server.dicom_port)  # while 200 connections sit idle
        assert_stored(server, fresh)
        still_open = wait_all_closed(socks)
        assert not still_open, f"{len(still_open)} idle connections never closed by the server\n{server.log_tail()}"
    finally:
        for sock in socks:
            sock.close()
    assert_all_slots_free(server)


def test_idle_associations_from_one_station_leave_room_for_others(server: Server, fresh: Path) -> None:
    held = [open_association(server.dicom_port, FLOODER) for _ in range(MAX_ASSOCIATIONS)]
    try:
        assert sum(a.is_established for a in held) == PER_STATION, server.log_tail()
        store_ok([fresh], server.dicom_port)  # another station gets in while they are held
        assert_stored(server, fresh)
    finally:
        release_all(held)
    assert_all_slots_free(server)


# -- item 2: slow senders ----------------------------------------------------------------------


def test_slowloris_before_association_is_dropped(server: Server, fresh: Path) -> None:
    socks = [socket.create_connection(("127.0.0.1", server.dicom_port), timeout=10) for _ in range(12)]
    for sock in socks:
        sock.sendall(declared_pdu(0x01, 2000))  # promise an A-ASSOCIATE-RQ, then trickle it
    drip = Drip(socks)
    try:
        store_ok([fresh], server.dicom_port)
        still_open = wait_all_closed(socks)
        assert not still_open, f"{len(still_open)} slow connections never closed\n{server.log_tail()}"
    finally:
        drip.close()
        for sock in socks:
            sock.close()
    assert_all_slots_free(server)


def test_slowloris_inside_an_association_is_dropped(server: Server, fresh: Path) -> None:
    assocs = [open_association(server.dicom_port, aet) for aet in (FLOODER, OTHER_STATION)]
    assert all(a.is_established for a in assocs), server.log_tail()
    raw = [a.dul.socket.socket for a in assocs]
    for sock in raw:
        sock.sendall(declared_pdu(0x04, 100_000))  # promise a P-DATA-TF, then trickle it
    drip = Drip(raw)
    try:
        deadline = time.monotonic() + CLOSE_DEADLINE_S
        while any(a.is_alive() for a in assocs) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(a.is_alive() for a in assocs), f"slow associations never ended\n{server.log_tail()}"
        store_ok([fresh], server.dicom_port)
    finally:
        drip.close()
        release_all(assocs)
    assert_all_slots_free(server)


# -- item 3: called AE title ------------------------------------------------------------------


def test_wrong_called_ae_title_is_rejected(server: Server, tmp_path: Path) -> None:
    run = echoscu(server.dicom_port, aec="OTHER_SCP")
    assert run.returncode != 0, run.describe()
    assert "Called AE Title Not Recognized" in run.output, run.describe()
    copy = copy_with_new_uids([SMALL_FILE], tmp_path)[0]
    assert storescu([copy], server.dicom_port, aec="OTHER_SCP").returncode != 0
    assert counts_for_sop(server.data_dir, read_uids(copy).sop)[0] == 0
    server.echo_ok()  # the right one still works


# -- item 5: data set size --------------------------------------------------------------------


def test_oversized_data_set_is_refused_and_nothing_stored(server: Server, tmp_path: Path) -> None:
    large, small = copy_with_new_uids([LARGE_FILE, SMALL_FILE], tmp_path)
    assert large.stat().st_size > MAX_DATASET_BYTES > small.stat().st_size
    run = storescu([large], server.dicom_port)
    assert run.returncode != 0 or "Success" not in run.store_responses, run.describe()
    assert counts_for_sop(server.data_dir, read_uids(large).sop)[0] == 0
    assert not list((server.data_dir / "dicom").rglob(f"{read_uids(large).sop}.dcm"))
    assert "data set larger than max_dataset_bytes" in server.log()
    store_ok([small], server.dicom_port)  # under the limit: stored as usual
    assert_store_consistent(server.data_dir)


def test_a_pdu_declared_over_the_limit_is_not_waited_for(lenient: Server) -> None:
    """One P-DATA PDU may declare up to 4 GB; the server must not start buffering it. The lenient
    server's timeouts are 300 s, so only the size check can close this connection in time."""
    assoc = open_association(lenient.dicom_port, OTHER_STATION, network_timeout=600)
    assert assoc.is_established, lenient.log_tail()
    try:
        assoc.dul.socket.socket.sendall(declared_pdu(0x04, 0xFFFF_FFF0) + b"\x00" * 1024)
        deadline = time.monotonic() + CLOSE_DEADLINE_S
        while assoc.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not assoc.is_alive(), f"the server waited for a 4 GB PDU\n{lenient.log_tail()}"
        assert "peer declared a PDU over the limit" in lenient.log()
        lenient.echo_ok()
    finally:
        release_all([assoc])


def test_flood_server_logged_no_errors_of_its_own(server: Server) -> None:
    """Refusals are warnings; an ERROR of ours (e.g. associations left after shutdown) is a bug."""
    assert not own_error_lines(server.log()), server.log_tail()


# -- the setting off, and shutdown with slow peers ----------------------------------------------


@pytest.fixture(scope="module")
def lenient(module_launcher: Any) -> Server:
    """Called AE check off; timeouts long enough that only shutdown can end a slow peer."""
    return module_launcher.launch(
        "gateway-lenient",
        env={
            "XRAY_TRIAGE_REQUIRE_CALLED_AE_TITLE": "false",
            "XRAY_TRIAGE_ASSOCIATION_REQUEST_TIMEOUT_S": "300",
            "XRAY_TRIAGE_NETWORK_TIMEOUT_S": "300",
            "XRAY_TRIAGE_SHUTDOWN_GRACE_S": "1",
        },
        stations=[(OTHER_STATION, "Other", None)],
    )


def test_called_ae_title_check_can_be_turned_off(lenient: Server) -> None:
    run = echoscu(lenient.dicom_port, aec="OTHER_SCP")
    assert run.returncode == 0, run.describe()


def test_sigterm_ends_slow_peers_after_the_grace_period(lenient: Server) -> None:
    before = [socket.create_connection(("127.0.0.1", lenient.dicom_port), timeout=10) for _ in range(4)]
    for sock in before:
        sock.sendall(declared_pdu(0x01, 2000))
    assocs = [open_association(lenient.dicom_port, aet, network_timeout=600) for aet in (STATION1, OTHER_STATION)]
    assert all(a.is_established for a in assocs), lenient.log_tail()
    inside = [a.dul.socket.socket for a in assocs]
    for sock in inside:
        sock.sendall(declared_pdu(0x04, 100_000))
    drip = Drip(before + inside)
    try:
        lenient.stop_cleanly()  # SIGTERM; fails if the process does not exit by itself
        assert not wait_all_closed(before), "connections left open after the server exited"
        deadline = time.monotonic() + CLOSE_DEADLINE_S
        while any(a.is_alive() for a in assocs) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(a.is_alive() for a in assocs)
    finally:
        drip.close()
        release_all(assocs)
        for sock in before:
            sock.close()
