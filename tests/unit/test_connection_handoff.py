"""Plain connections handed to the gateway's processes in turn (``gateway_processes``, issue 17).

Real Unix sockets: ``ReceiverPool.handoff`` passes a connected socket's descriptor with
``SCM_RIGHTS``; what arrives on the receiver's end is the same connection.
"""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Iterator

import pytest

from xray_triage.events import EventHandlers
from xray_triage.settings import Settings
from xray_triage_server.receiver_pool import ReceiverPool


@pytest.fixture
def pool_and_ends(request: pytest.FixtureRequest) -> Iterator[tuple[ReceiverPool, list[socket.socket]]]:
    serve_here = request.param
    pool = ReceiverPool(Settings(gateway_processes=3), EventHandlers(), health={}, serve_here=serve_here)
    ends = []
    for receiver in pool.receivers:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        receiver.channel, receiver.listening = ours, True
        theirs.setblocking(False)
        ends.append(theirs)
    yield pool, ends
    for receiver in pool.receivers:
        receiver.channel.close()  # type: ignore[union-attr]
    for end in ends:
        end.close()


def _offer(pool: ReceiverPool, ends: list[socket.socket], n: int) -> Counter[str]:
    """Offer ``n`` connections; which process got each ('here', 'r1', 'r2'), checked end to end."""
    got: Counter[str] = Counter()
    for i in range(n):
        station, server_side = socket.socketpair()
        with station, server_side:
            if not pool.handoff(server_side, ("127.0.0.1", 10000 + i)):
                got["here"] += 1
                continue
            (who,) = [k for k, end in enumerate(ends) if _has_message(end)]
            _message, fds, _flags, _address = socket.recv_fds(ends[who], 16, 4)
            with socket.socket(fileno=fds[0]) as handed:
                station.sendall(f"association {i}".encode())
                assert handed.recv(64) == f"association {i}".encode()  # the same connection
            got[f"r{who + 1}"] += 1
    return got


def _has_message(end: socket.socket) -> bool:
    try:
        end.recv(1, socket.MSG_PEEK)
        return True
    except BlockingIOError:
        return False


@pytest.mark.parametrize("pool_and_ends", [True], indirect=True)
def test_connections_go_to_each_process_in_turn(pool_and_ends) -> None:  # type: ignore[no-untyped-def]
    pool, ends = pool_and_ends
    assert _offer(pool, ends, 9) == {"here": 3, "r1": 3, "r2": 3}
    assert pool.handed_off == 6


@pytest.mark.parametrize("pool_and_ends", [False], indirect=True)
def test_a_triaging_gateway_process_hands_every_connection_on(pool_and_ends) -> None:  # type: ignore[no-untyped-def]
    pool, ends = pool_and_ends
    assert _offer(pool, ends, 8) == {"r1": 4, "r2": 4}


@pytest.mark.parametrize("pool_and_ends", [False], indirect=True)
def test_a_receiver_that_does_not_listen_is_skipped_and_none_means_here(pool_and_ends) -> None:  # type: ignore[no-untyped-def]
    pool, ends = pool_and_ends
    pool.receivers[0].listening = False
    assert _offer(pool, ends, 4) == {"r2": 4}
    pool.receivers[1].listening = False
    assert _offer(pool, ends, 2) == {"here": 2}
