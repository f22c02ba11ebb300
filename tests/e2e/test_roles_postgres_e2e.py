"""Several processes on one PostgreSQL database: one gateway+web process and two worker processes.

Four ``storescu`` senders send 50 small chest images each while the workers triage them; one
worker is killed with SIGKILL while it holds a job. Every image must be triaged exactly once (one
result per instance), none lost, and the killed worker's job taken over by the other worker once
its lease has run out (``job_lease_s``, small here), not before.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from db_helpers import on_postgres
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from e2e_helpers import STATION1, Server, query, scalar, store_ok

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not on_postgres(),
        reason="runs in the PostgreSQL pass of scripts/test.sh (XRAY_TRIAGE_TEST_DATABASE_URL)",
    ),
]

SENDERS, PER_SENDER = 4, 50
LEASE_S = "3"
DEADLINE_S = 240.0


def write_chest_images(directory: Path, sender: int) -> list[Path]:
    """PER_SENDER small DX chest images (64 x 64, 16 bit) in one study of their own."""
    directory.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    rng = np.random.default_rng(sender)
    paths = []
    for n in range(PER_SENDER):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image - For Presentation
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientName, ds.PatientID = f"Roles^Sender{sender}", f"R{sender}"
        ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
        ds.InstanceNumber = n + 1
        ds.Rows = ds.Columns = 64
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = rng.integers(0, 4096, size=(64, 64), dtype=np.uint16).tobytes()
        path = directory / f"{n:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _stop_while_holding_a_job(worker: Server, deadline_s: float = 120.0) -> int:
    """SIGSTOP ``worker`` at a moment it holds a running job; return that job's id.

    Stopped, the process cannot finish the job, so the check after the stop is stable.
    """
    assert worker.proc is not None
    prefix = f"{socket.gethostname()[:40]}:{worker.proc.pid}/%"
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if scalar(
            worker.data_dir,
            "SELECT count(*) FROM triage_jobs WHERE state = 'running' AND worker LIKE ?",
            (prefix,),
        ):
            os.kill(worker.proc.pid, signal.SIGSTOP)
            rows = query(
                worker.data_dir,
                "SELECT id FROM triage_jobs WHERE state = 'running' AND worker LIKE ?",
                (prefix,),
            )
            if rows:
                return int(rows[0][0])
            os.kill(worker.proc.pid, signal.SIGCONT)
        time.sleep(0.005)
    raise AssertionError(f"worker never held a job within {deadline_s} s\n{worker.log_tail()}")


def test_gateway_web_and_two_workers_triage_each_image_once_after_a_kill_9(
    launch_server, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    env = {"XRAY_TRIAGE_JOB_LEASE_S": LEASE_S}
    front = launch_server.launch("front", env={**env, "XRAY_TRIAGE_ROLES": "gateway,web"})
    workers = []
    for n in range(2):
        worker = Server(
            root=tmp_path / f"worker{n}", model_dir=launch_server.tiny_model, env_extra=env, roles="worker"
        )
        worker.root.mkdir()
        worker.data_dir = front.data_dir  # shared storage: the same data directory and database
        launch_server.servers.append(worker)
        worker.start()
        workers.append(worker)
    victim, survivor = workers
    files = [write_chest_images(tmp_path / f"images{n}", n) for n in range(SENDERS)]

    errors: list[str] = []

    def send(paths: list[Path]) -> None:
        try:
            store_ok(paths, front.dicom_port, aet=STATION1)
        except AssertionError as exc:
            errors.append(str(exc))

    senders = [threading.Thread(target=send, args=(paths,)) for paths in files]
    for thread in senders:
        thread.start()
    held = _stop_while_holding_a_job(victim)
    victim.kill9()
    for thread in senders:
        thread.join(DEADLINE_S)
    assert not errors, errors[0]

    total = SENDERS * PER_SENDER
    deadline = time.monotonic() + DEADLINE_S
    while (
        scalar(front.data_dir, "SELECT count(*) FROM triage_jobs WHERE state IN ('done', 'failed')") < total
    ):
        assert time.monotonic() < deadline, (
            f"not every job finished: {query(front.data_dir, 'SELECT state, count(*) FROM triage_jobs GROUP BY state')}"
            f"\n{survivor.log_tail()}"
        )
        assert survivor.running, survivor.log_tail()
        time.sleep(0.25)

    assert scalar(front.data_dir, "SELECT count(*) FROM instances") == total  # none lost
    assert scalar(front.data_dir, "SELECT count(*) FROM triage_results") == total  # exactly once each
    assert scalar(front.data_dir, "SELECT count(DISTINCT instance_id) FROM triage_results") == total
    assert query(front.data_dir, "SELECT DISTINCT ai_status FROM instances")[0][0] == "done"
    assert scalar(front.data_dir, "SELECT count(DISTINCT ai_status) FROM instances") == 1
    state, worker_id, attempts = query(
        front.data_dir, "SELECT state, worker, attempts FROM triage_jobs WHERE id = ?", (held,)
    )[0]
    assert (state, attempts) == ("done", 2) and worker_id.split("/")[0].endswith(f":{survivor.proc.pid}")
    assert "took over a triage job whose lease expired" in survivor.log(), survivor.log_tail()
    # Every result came from a worker process: the gateway+web process runs no model.
    assert "triage workers started" not in front.log()
