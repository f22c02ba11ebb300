"""Units of the gateway's network defences: association slot limits and the pending gate.

The gate is driven with real TCP connections on 127.0.0.1 and an injected clock
(the request deadline never depends on the test machine's speed).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from dicom_gateway.connections import PendingGate, PendingLimits
from dicom_gateway.limits import SlotLimits, SlotTable

LIMITS = SlotLimits(max_associations=6, per_station=2, per_address=3, reserved_for_registered=2)


def test_slot_limits_per_station_per_address_and_total() -> None:
    live = [("A", "10.0.0.1", True), ("A", "10.0.0.2", True)]
    assert "'A' already holds 2" in (LIMITS.refusal(live, "A", "10.0.0.3", True) or "")
    assert LIMITS.refusal(live, "B", "10.0.0.1", True) is None
    live += [("B", "10.0.0.1", True), ("C", "10.0.0.1", True)]
    assert "10.0.0.1 already holds 3" in (LIMITS.refusal(live, "D", "10.0.0.1", True) or "")
    live += [("D", "10.0.0.4", True), ("E", "10.0.0.5", True)]
    assert "all 6" in (LIMITS.refusal(live, "F", "10.0.0.6", True) or "")


def test_unregistered_stations_never_take_the_reserved_slots() -> None:
    live = [(f"U{n}", f"10.0.1.{n}", False) for n in range(4)]  # 6 - 2 reserved = 4 open to unknown ones
    assert "open to unregistered stations" in (LIMITS.refusal(live, "U9", "10.0.1.9", False) or "")
    assert LIMITS.refusal(live, "REG", "10.0.2.1", True) is None  # a registered station still gets in


def test_slot_table_frees_a_slot_on_release_and_prune() -> None:
    table = SlotTable(SlotLimits(max_associations=1, per_station=1, per_address=1, reserved_for_registered=0))
    assert table.try_take("a1", "A", "10.0.0.1", True) is None
    assert table.try_take("a2", "B", "10.0.0.2", True) is not None
    table.release("a1")
    assert table.try_take("a2", "B", "10.0.0.2", True) is None
    table.prune(alive=set())
    assert len(table) == 0


# -- the pending gate -------------------------------------------------------------------------


class FakeClock:
    """Moves 0.05 s per reading, so a gate that missed an event still ends at its deadline
    (and the test fails on the counts) instead of hanging."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 0.05
        return self.now


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server


def pair(listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    """(client, server side) of one real TCP connection."""
    client = socket.create_connection(listener.getsockname(), timeout=10)
    accepted, _ = listener.accept()
    return client, accepted


def gate(clock: FakeClock, max_pending: int = 8, per_address: int = 2) -> PendingGate:
    return PendingGate(
        PendingLimits(request_timeout_s=5, max_pending=max_pending, max_pending_per_address=per_address, read_timeout_s=1),
        clock=clock,
    )


def request_pdu(body_len: int = 64) -> bytes:
    return bytes([0x01, 0]) + body_len.to_bytes(4, "big") + b"\x00" * body_len


def eof(client: socket.socket) -> bool:
    client.settimeout(10)
    try:
        return client.recv(1) == b""
    except ConnectionResetError:
        return True


def test_complete_request_is_handed_over(listener: socket.socket) -> None:
    g = gate(FakeClock())
    client, accepted = pair(listener)
    entry = g.register(accepted, "127.0.0.1")
    client.sendall(request_pdu())
    assert entry is not None and g.wait_for_request(entry)
    assert g.stats.handed_over == 1 and len(g) == 0
    assert accepted.recv(6, socket.MSG_PEEK)[0] == 0x01  # nothing consumed: pynetdicom reads it all


def test_garbage_partial_then_close_and_silence_are_dropped(listener: socket.socket) -> None:
    clock = FakeClock()
    g = gate(clock, per_address=8)
    garbage, partial, silent = (pair(listener) for _ in range(3))
    entries = [g.register(side, "127.0.0.1") for _, side in (garbage, partial, silent)]
    garbage[0].sendall(b"GET / HTTP/1.0\r\n\r\n")
    partial[0].sendall(request_pdu()[:20])
    partial[0].close()  # cut short, then gone: noticed without waiting for the deadline
    assert not g.wait_for_request(entries[0])
    assert not g.wait_for_request(entries[1])
    clock.now += 5.1  # past the request deadline
    assert not g.wait_for_request(entries[2])
    assert (g.stats.not_a_request, g.stats.closed_by_peer, g.stats.timed_out) == (1, 1, 1)


def test_a_full_address_drops_its_oldest_waiting_connection(listener: socket.socket) -> None:
    g = gate(FakeClock(), per_address=2)
    pairs = [pair(listener) for _ in range(3)]
    entries = [g.register(side, "127.0.0.1") for _, side in pairs]
    assert eof(pairs[0][0])  # the oldest idle connection was closed
    assert entries[0] is not None and not g.wait_for_request(entries[0])
    assert g.stats.evicted == 1 and len(g) == 2
    pairs[2][0].sendall(request_pdu())  # the newcomer (a station) gets through
    assert entries[2] is not None and g.wait_for_request(entries[2])


def test_the_total_cap_drops_the_oldest_of_any_address(listener: socket.socket) -> None:
    g = gate(FakeClock(), max_pending=2, per_address=2)
    pairs = [pair(listener) for _ in range(3)]
    for n, (_, side) in enumerate(pairs):
        g.register(side, f"10.0.0.{n}")
    assert eof(pairs[0][0]) and g.stats.evicted == 1


def test_stop_closes_waiting_connections_and_refuses_new_ones(listener: socket.socket) -> None:
    g = gate(FakeClock())
    client, accepted = pair(listener)
    g.register(accepted, "127.0.0.1")
    assert g.stop() == 1 and eof(client)
    _, late = pair(listener)
    assert g.register(late, "127.0.0.1") is None
