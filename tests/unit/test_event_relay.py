"""Events committed in a receiver process reach the gateway process's handlers (``gateway_processes``).

Real pipes (``os.pipe``), real ``EventHandlers``: a receiver's ``EventRelay`` writes, the
gateway process's ``ReceiverPool.take_lines`` reads back and dispatches.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from xray_triage.events import (
    Event,
    EventHandlers,
    EventRelay,
    InstanceQuarantined,
    InstanceStored,
    TriageCompleted,
    UnknownEvent,
    relay_line,
    relayed,
)
from xray_triage.settings import Settings
from xray_triage_server.receiver_pool import ReceiverPool, settings_line

STORED = InstanceStored("1.2.3", "STATION_A", "1.2.3.4.5", "1.2.3.4", 7, True)
QUARANTINED = InstanceQuarantined("1.2.9", "STATION_B", "1.2.9.1", 3, "Thạnh An: other patient")
COMPLETED = TriageCompleted("1.2.3", "STATION_A", "1.2.3.4.5", 7, "urgent", ("Pneumothorax", "Effusion"))


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_fd, write_fd = os.pipe()
    yield read_fd, write_fd
    for fd in (read_fd, write_fd):
        with contextlib.suppress(OSError):
            os.close(fd)


def _read_lines(fd: int) -> list[bytes]:
    os.set_blocking(fd, False)
    data = b""
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return data.split(b"\n")[:-1]


def test_a_relayed_line_is_the_same_event() -> None:
    for event in (STORED, QUARANTINED, COMPLETED):
        line = relay_line(event)
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        assert relayed(line.rstrip(b"\n")) == event


def test_lines_this_version_cannot_read_are_refused() -> None:
    with pytest.raises(UnknownEvent):
        relayed(b'{"type": "no.such.event", "payload": {}}')
    with pytest.raises(UnknownEvent):
        relayed(b"not json")
    with pytest.raises(UnknownEvent):
        relayed(b'{"payload": {}}')


def test_committed_events_go_through_the_pipe_to_the_other_process_handlers(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    receiver_side = EventHandlers()
    receiver_side.register(Event, EventRelay(write_fd))
    receiver_side.dispatch([STORED, QUARANTINED])
    receiver_side.dispatch([COMPLETED])

    gateway_side = EventHandlers()
    seen: list[Event] = []
    woken: list[int] = []
    gateway_side.register(Event, seen.append)
    gateway_side.register(InstanceStored, lambda e: woken.append(e.instance_id) if e.triage_queued else None)
    pool = ReceiverPool(Settings(gateway_processes=2), gateway_side, health={})
    pool.take_lines(_read_lines(read_fd))

    assert seen == [STORED, QUARANTINED, COMPLETED]
    assert woken == [7]  # what serve.py registers to wake its triage workers
    assert pool.relayed == 3


def test_a_full_pipe_drops_events_instead_of_blocking_the_commit(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 4096)  # the smallest pipe: full after a few lines
    relay = EventRelay(write_fd)
    for _ in range(200):
        relay(STORED)  # would block for ever on a blocking pipe nobody reads
    assert relay.dropped > 0
    lines = _read_lines(read_fd)
    assert len(lines) == 200 - relay.dropped
    assert all(relayed(line) == STORED for line in lines)


def test_a_gone_reader_is_noted_not_raised(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    os.close(read_fd)
    relay = EventRelay(write_fd)
    relay(STORED)
    assert relay.reader_gone


def test_health_counts_only_listening_receivers_of_the_running_process(pipe: tuple[int, int]) -> None:
    health: dict[str, object] = {}
    pool = ReceiverPool(Settings(gateway_processes=3), EventHandlers(), health=health)
    assert health["dicom_receivers"] == {"status": "degraded", "configured": 2, "listening": 0}
    # A line from a receiver that is not running (died since it wrote) does not count.
    pool.take_lines([b'{"receiver": 1, "pid": 999999}', b'{"receiver": 1, broken', b"garbage"])
    assert health["dicom_receivers"] == {"status": "degraded", "configured": 2, "listening": 0}


def test_a_receiver_reads_exactly_the_settings_of_its_gateway_process(
    pipe: tuple[int, int], tmp_path: Path
) -> None:
    """What ``ReceiverPool`` writes on a receiver's stdin (with the bound ports) is what
    ``read_settings`` gives back, however the gateway process got its settings (here: code, not
    a file or the environment the receiver could read again)."""
    from xray_triage_server.receiver import read_settings

    read_fd, write_fd = pipe
    settings = Settings(
        data_dir=tmp_path / "data",
        gateway_processes=3,
        dicom_port=0,
        max_associations=12,
        reserved_station_associations=2,
        destinations=[
            {"name": "pacs", "ae_title": "PACS", "host": "10.0.0.9", "port": 104, "send": ["images"]}
        ],
        triage_body_parts=["CHEST", "THORAX"],
        default_character_set="ISO_IR 192",
    )
    os.write(write_fd, settings_line(settings, plain_port=41104, tls_port=None))
    assert read_settings(read_fd) == settings.model_copy(update={"dicom_port": 41104})
