"""End to end: a restart on a full disk starts degraded instead of exiting, and recovers.

The data directory is a small tmpfs (a real file system that really fills up:
``ENOSPC`` from the kernel, SQLite's "database or disk is full"), mounted for the
test and filled with a file. Mounting needs root (or CAP_SYS_ADMIN); elsewhere
the test is skipped.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from db_helpers import on_postgres

from e2e_helpers import (
    SampleFile,
    Server,
    assert_store_consistent,
    connect_db,
    copy_with_new_uids,
    counts_for_sop,
    http,
    read_uids,
    send_raw_c_store,
    store_ok,
    storescu,
)

pytestmark = [
    pytest.mark.slow,
    # What fills up here is the SQLite database beside the files (its -wal/-shm); a PostgreSQL
    # server keeps its data elsewhere, and the file side is covered by the SQLite pass.
    pytest.mark.skipif(on_postgres(), reason="SQLite on the full disk (runs in the SQLite pass)"),
]

DISK_MB = 48
MIN_FREE_MB = 4
DEADLINE_S = 120.0


def mount_tmpfs(where: Path, size_mb: int) -> None:
    """Mount a tmpfs of ``size_mb`` on ``where``, keeping what was in it; skip if not allowed."""
    keep = where.with_name(where.name + "-before-mount")
    shutil.copytree(where, keep)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(where)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        shutil.rmtree(keep)
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {proc.stderr.strip()}")
    shutil.copytree(keep, where, dirs_exist_ok=True)
    shutil.rmtree(keep)


def fill_disk(disk: Path) -> Path:
    """Write a file until the file system says ENOSPC; return it (delete it to free the disk)."""
    filler = disk / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for chunk in (b"\0" * (1 << 20), b"\0" * 4096, b"\0"):
            for _ in range(DISK_MB * 1024 * 1024 // len(chunk) + 2):  # bounded: the disk is DISK_MB
                try:
                    os.write(fd, chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
        os.fsync(fd)
    finally:
        os.close(fd)
    assert shutil.disk_usage(disk).free < 64 * 1024, shutil.disk_usage(disk)
    return filler


def health(server: Server) -> tuple[int, dict[str, Any]]:
    response = http.get(server.url("/healthz"), timeout=10)
    return response.status_code, response.json()


def wait_for(server: Server, what: str, condition: Any) -> Any:
    """Poll ``condition()`` until it returns a truthy value; fail with the log if the server dies."""
    deadline = time.monotonic() + DEADLINE_S
    last: Any = None
    while time.monotonic() < deadline:
        assert server.running, f"server exited while waiting for {what}\n{server.log_tail()}"
        try:
            last = condition()
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = repr(exc)
        else:
            if last:
                return last
        time.sleep(0.2)
    raise AssertionError(f"no {what} after {DEADLINE_S} s (last: {last})\n{server.log_tail()}")


@pytest.mark.parametrize("stopped_by", ["crash", "sigterm"])
def test_restart_on_a_full_disk_starts_degraded_and_recovers(
    launch_server: Any, samples: list[SampleFile], tmp_path: Path, stopped_by: str
) -> None:
    """``crash``: kill -9 left SQLite's -wal/-shm files; the database reads, its first write fails:
    C-STORE is answered 0xA700. ``sigterm``: a clean stop removed them and SQLite cannot even
    create its -shm file to read: associations are rejected as transient (the modality retries)."""
    source = next(s.path for s in samples if s.name.startswith("dev_01"))
    first, second = copy_with_new_uids([source, source], tmp_path / "images")
    env = {
        "XRAY_TRIAGE_TRIAGE_WORKERS": "0",
        "XRAY_TRIAGE_MIN_FREE_DISK_MB": str(MIN_FREE_MB),
        "XRAY_TRIAGE_STORAGE_RETRY_S": "0.3",
    }
    server = launch_server.launch("disk-full", env=env, start=False)
    mount_tmpfs(server.data_dir, DISK_MB)
    try:
        server.start()
        store_ok([first], server.dicom_port)
        # A crash mid-job (as the site had): the job is left running, the SQLite
        # -wal/-shm files stay behind, and the restart must write to re-queue the job.
        conn = connect_db(server.data_dir)
        try:
            with conn:
                conn.execute("UPDATE triage_jobs SET state = 'running', worker = 'worker-0', attempts = 1")
        finally:
            conn.close()
        if stopped_by == "crash":
            server.kill9()
        else:
            server.stop_cleanly()
        filler = fill_disk(server.data_dir)

        server.start(env_extra={**env, "XRAY_TRIAGE_TRIAGE_WORKERS": "1"}, wait=False)
        code, body = wait_for(server, "a /healthz answer", lambda: health(server))
        assert code == 503 and body["status"] == "degraded", body
        assert body["storage"] == "degraded" and body["disk_free_mb"] < MIN_FREE_MB, body
        assert body["storage_problem"], body
        assert "started degraded" in server.log(), server.log_tail()
        if stopped_by == "crash":
            server.echo_ok()
            status = send_raw_c_store(second, server.dicom_port)
            assert status == 0xA700, f"status 0x{status:04X}, expected 0xA700\n{server.log_tail()}"
        else:
            run = storescu([second], server.dicom_port)
            assert run.returncode != 0 and "Success" not in run.store_responses, run.describe()
            assert "Association Rejected" in run.output and "Transient" in run.output, run.describe()
        assert not list((server.data_dir / "dicom").rglob(f"{read_uids(second).sop}.dcm"))

        filler.unlink()
        code, body = wait_for(server, "recovery", lambda: (lambda h: h if h[0] == 200 else None)(health(server)))
        assert body["status"] == "ok" and body["storage"] == "ok" and body["disk_free_mb"] >= MIN_FREE_MB, body
        assert "storage recovered" in server.log(), server.log_tail()
        uids = read_uids(first)
        study = server.wait_final([uids.study])[uids.study]
        assert study["ai_status"] == "done", study  # the interrupted job was re-queued and triaged
        store_ok([second], server.dicom_port)
        assert counts_for_sop(server.data_dir, read_uids(second).sop)[0] == 1
        server.stop_cleanly()
        assert_store_consistent(server.data_dir)
    finally:
        if server.running:
            server.stop()
        subprocess.run(["umount", "-l", str(server.data_dir)], capture_output=True)
