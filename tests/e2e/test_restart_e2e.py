"""End to end: stop, crash and restart a real server; nothing acknowledged is lost."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from e2e_helpers import (
    AcknowledgedBurst,
    SampleFile,
    assert_acknowledged_kept,
    assert_store_consistent,
    assert_triaged,
    copy_with_new_uids,
    counts_for_sop,
    execute,
    model_labels,
    port_open,
    query,
    read_uids,
    resend_and_assert_each_once,
    store_ok,
)

pytestmark = pytest.mark.slow


def test_queued_and_interrupted_jobs_are_triaged_after_restart(
    launch_server: Any, samples: list[SampleFile], tiny_model: Path
) -> None:
    server = launch_server.launch("store-only", env={"XRAY_TRIAGE_TRIAGE_WORKERS": "0"})
    picks = samples[:3]
    for sample in picks:
        store_ok([sample.path], server.dicom_port)
    uids = [read_uids(s.path) for s in picks]

    time.sleep(1.5)  # give a (wrongly) running worker the chance to pick the jobs up
    for u in uids:
        study = server.study(u.study)
        assert study["ai_status"] == "pending", study
        (image,) = study["images"]
        assert image["ai_status"] == "pending" and image["result"] is None, image
    jobs = query(server.data_dir, "SELECT state FROM triage_jobs")
    assert [j["state"] for j in jobs] == ["queued"] * 3
    assert "triage_workers = 0" in server.log()
    server.stop_cleanly()

    # Simulate a crash in the middle of a job: it was claimed, never finished.
    # It has no lease (as a job of 0.1.0's): the restart re-queues it.
    changed = execute(
        server.data_dir,
        "UPDATE triage_jobs SET state = 'running', worker = 'worker-0', attempts = 1, "
        "started_at = CURRENT_TIMESTAMP WHERE id = (SELECT MIN(id) FROM triage_jobs)",
    )
    assert changed == 1

    server.start(env_extra={})  # normal settings: one triage worker
    studies = server.wait_final(u.study for u in uids)
    labels = model_labels(tiny_model)
    for u in uids:
        study = studies[u.study]
        assert study["ai_status"] == "done", study
        assert_triaged(study["images"][0], labels)
        assert counts_for_sop(server.data_dir, u.sop) == (1, 1, 1)
    jobs = query(server.data_dir, "SELECT state FROM triage_jobs")
    assert [j["state"] for j in jobs] == ["done"] * 3
    assert "re-queued jobs interrupted" in server.log(), server.log_tail()
    assert_store_consistent(server.data_dir)


def test_kill_9_during_a_burst_loses_nothing_acknowledged(
    launch_server: Any, samples: list[SampleFile], tmp_path: Path
) -> None:
    server = launch_server.launch("kill9")
    sources = [s.path for s in samples if s.rows <= 1024] * 2  # small files: many sends per second
    copies = copy_with_new_uids(sources, tmp_path / "burst")
    burst = AcknowledgedBurst([copies[0::2], copies[1::2]], server.dicom_port)
    burst.start()
    burst.wait_acknowledged(4)  # let a few through, then pull the plug mid-burst
    server.kill9()
    acked = burst.join()
    assert len(burst.results) == len(copies)
    not_acked = [f for f in copies if f not in acked]
    assert len(acked) >= 4
    assert not_acked, "the kill did not land during the burst"

    server.start()  # same data directory, fresh process
    assert_store_consistent(server.data_dir)
    assert_acknowledged_kept(server, acked)
    resend_and_assert_each_once(server, copies, acked)
    assert_store_consistent(server.data_dir)


def test_sigterm_while_idle_shuts_down_cleanly(launch_server: Any) -> None:
    server = launch_server.launch("idle")
    dicom_port, http_port = server.dicom_port, server.http_port
    server.echo_ok()  # a full association, released: the gateway is idle again afterwards
    assert server.api("/healthz")["status"] == "ok"
    code = server.stop()
    assert code == 0, server.log_tail()
    log = server.log()
    assert "shutting down" in log, server.log_tail()
    assert "DICOM gateway stopped aborted=0" in log, server.log_tail()  # nothing was in flight
    assert any(line.endswith(": stopped") for line in log.splitlines()), server.log_tail()
    assert not port_open(dicom_port) and not port_open(http_port)
