"""End to end: several gateway processes on one DICOM port (``gateway_processes = 2``).

A real ``serve`` process starts one receiver process (``serve --roles receiver``); the gateway
process accepts plain connections and, since it triages, hands every one of them to the receiver
(``SCM_RIGHTS``; the turns themselves are in tests/unit/test_connection_handoff.py).
Checked: concurrent senders' associations all go to the receiver and every
image is stored and triaged (the receiver's commits wake the gateway process's triage workers
through the events pipe); SIGTERM stops both, exit 0; a receiver killed with SIGKILL while
senders send is restarted and nothing it acknowledged is lost.
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from e2e_helpers import (
    STATION1,
    AcknowledgedBurst,
    SampleFile,
    Server,
    assert_acknowledged_kept,
    assert_store_consistent,
    copy_with_new_uids,
    counts_for_sop,
    create_users,
    http,
    read_uids,
    resend_and_assert_each_once,
    store_ok,
)

pytestmark = pytest.mark.slow

TWO_PROCESSES = {"XRAY_TRIAGE_GATEWAY_PROCESSES": "2"}
RESTART_DEADLINE_S = 120.0


def _receiver_pids(server: Server) -> list[int]:
    """The receiver processes the gateway process started, in order (its log)."""
    return [int(pid) for pid in re.findall(r"receiver process started receiver=1 pid=(\d+)", server.log())]


def _alive(pid: int) -> bool:
    """Running (a zombie whose new parent has not reaped it yet has ended: not alive)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _small_copies(samples: list[SampleFile], tmp_path: Path, count: int) -> list[Path]:
    sources = [s.path for s in samples if s.rows <= 1024]
    return copy_with_new_uids((sources * count)[:count], tmp_path / "copies")


def test_four_senders_over_two_processes_store_and_triage_everything_then_sigterm_stops_both(
    launch_server: Any, samples: list[SampleFile], tmp_path: Path
) -> None:
    server = launch_server.launch("two", env=TWO_PROCESSES)
    health = server.api("/healthz")  # ready: the helper waited for 200, i.e. the receiver listens
    assert health["dicom_receivers"] == {"status": "ok", "configured": 1, "listening": 1}, health
    (receiver_pid,) = _receiver_pids(server)
    tokens = create_users(server.data_dir, [("metrics-admin", "admin", None, "metrics-admin-password")])

    # 4 senders x 4 images, one association each: 16 associations, all handed to the receiver
    # (the gateway process triages: its interpreter is left to triage).
    copies = _small_copies(samples, tmp_path, 16)
    errors: list[BaseException] = []

    def sender(files: list[Path]) -> None:
        try:
            for f in files:
                store_ok([f], server.dicom_port)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=sender, args=(copies[n::4],)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors

    studies = server.wait_final(read_uids(f).study for f in copies)
    for f in copies:
        uids = read_uids(f)
        assert studies[uids.study]["ai_status"] == "done", studies[uids.study]
        assert counts_for_sop(server.data_dir, uids.sop) == (1, 1, 1), f.name
    assert_store_consistent(server.data_dir)

    stored_lines = [line for line in server.log().splitlines() if "C-STORE stored" in line]
    by_receiver = [line for line in stored_lines if f"receiver=1 pid={receiver_pid}" in line]
    assert len(stored_lines) == len(copies), server.log_tail()
    assert len(by_receiver) == len(copies), f"{len(by_receiver)} of {len(copies)} stored by the receiver"
    # The receiver's events are relayed: the gateway process's counters include its images.
    metrics = http.get(server.url("/metrics"), headers={"Authorization": f"Bearer {tokens['metrics-admin']}"})
    assert metrics.status_code == 200, metrics.text[:500]
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics.text)
        for sample in family.samples
    }
    assert samples[("xray_triage_images_received_total", (("station", STATION1),))] == len(copies)

    server.stop_cleanly()  # SIGTERM to the gateway process: exit 0 and its "stopped" line
    assert not _alive(receiver_pid), "the receiver process outlived the gateway process"
    assert re.search(rf"receiver: stopped receiver=1 pid={receiver_pid}", server.log()), server.log_tail()
    assert "receiver exited with an error" not in server.log(), server.log_tail()


def test_a_killed_receiver_is_restarted_and_nothing_acknowledged_is_lost(
    launch_server: Any, samples: list[SampleFile], tmp_path: Path
) -> None:
    server = launch_server.launch("kill-receiver", env=TWO_PROCESSES)
    (first_pid,) = _receiver_pids(server)
    copies = _small_copies(samples, tmp_path, 24)
    burst = AcknowledgedBurst([copies[n::3] for n in range(3)], server.dicom_port)
    burst.start()
    burst.wait_acknowledged(4)  # let a few through, then kill the receiver mid-burst
    os.kill(first_pid, 9)
    acked = burst.join()
    assert len(burst.results) == len(copies)

    # The gateway process noticed, said so, and started another receiver that listens again.
    deadline = time.monotonic() + RESTART_DEADLINE_S
    while time.monotonic() < deadline:
        pids = _receiver_pids(server)
        if len(pids) == 2 and http.get(server.url("/healthz")).json()["dicom_receivers"]["listening"] == 1:
            break
        time.sleep(0.25)
    pids = _receiver_pids(server)
    assert len(pids) == 2 and pids[1] != first_pid and _alive(pids[1]), server.log_tail()
    health = server.api("/healthz")["dicom_receivers"]
    assert health == {"status": "ok", "configured": 1, "listening": 1}, server.log_tail()
    assert re.search(rf"receiver process died: restarting it receiver=1 pid={first_pid}", server.log())
    assert server.running, server.log_tail()

    assert_acknowledged_kept(server, acked)
    resend_and_assert_each_once(server, copies, acked)
    # What the killed receiver was writing is removed at the next start (alone on the data directory).
    server.stop_cleanly()
    assert not any(_alive(pid) for pid in pids)
    server.start()
    assert_store_consistent(server.data_dir)


def test_receivers_stop_by_themselves_when_the_gateway_process_is_killed(launch_server: Any) -> None:
    server = launch_server.launch("kill-gateway", env={"XRAY_TRIAGE_GATEWAY_PROCESSES": "3"})
    pids = _receiver_pids(server) + [
        int(pid) for pid in re.findall(r"receiver process started receiver=2 pid=(\d+)", server.log())
    ]
    assert len(pids) == 2 and all(_alive(pid) for pid in pids), server.log_tail()
    server.kill9()  # no SIGTERM reaches the receivers: their stdin reaches end-of-file
    deadline = time.monotonic() + RESTART_DEADLINE_S
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids), server.log_tail()
    assert server.log().count("the gateway process has gone: stopping") == 2, server.log_tail()
