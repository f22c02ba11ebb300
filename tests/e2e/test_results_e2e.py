"""A real server: an image sent with storescu comes back as an AI SR and an AI GSPS in its study.

One server, one image (lean). The tiny model with every threshold at 0 flags every label, so
the objects have findings. The objects must be filed (rows, files, ``ResultObjectStored`` in the
outbox) without becoming images of the study, and survive a restart (the start-up clean-up of
files without a row must know them).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pydicom
from db_helpers import db_env
from dicom_validators import dciodvfy
from sqlalchemy import select

from e2e_helpers import copy_with_new_uids, read_uids, store_ok
from onnx_factory import write_tiny_model_dir
from xray_triage.events import ResultObjectStored
from xray_triage.settings import load_settings
from xray_triage.store import outbox
from xray_triage.store.db import open_database
from xray_triage.store.result_objects import ResultObject
from xray_triage.store.schema import Instance

ROOT = "1.2.826.0.1.3680043.10.555"


def _wait_for_objects(data_dir: Path, count: int, deadline_s: float = 60.0) -> tuple[list[ResultObject], list[Any], list[str]]:
    """(result objects, outbox events, instance SOP UIDs) once ``count`` objects are filed (bounded polling)."""
    url = db_env(data_dir).get("XRAY_TRIAGE_DATABASE_URL")  # the server's database (SQLite or PostgreSQL)
    db = open_database(load_settings(None, data_dir=data_dir, **({"database_url": url} if url else {})))
    try:
        deadline = time.monotonic() + deadline_s
        while True:
            with db.read_session() as session:
                rows = list(session.scalars(select(ResultObject).order_by(ResultObject.id)))
                events = [e.event for e in outbox.read_after(session, 0, 10_000)[0]]
                instances = list(session.scalars(select(Instance.sop_instance_uid)))
                session.expunge_all()
            if len(rows) >= count:
                return rows, events, instances
            assert time.monotonic() < deadline, f"timed out waiting for {count} result objects, have {len(rows)}"
            time.sleep(0.2)
    finally:
        db.dispose()


def test_sent_image_comes_back_as_ai_sr_and_gsps(
    launch_server: Any, shared_dicom: Path, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    write_tiny_model_dir(model, thresholds={"Abnormal": 0.0, "Effusion": 0.0, "Pneumothorax": 0.0})
    server = launch_server.launch("results", model=model, env={"XRAY_TRIAGE_UID_ROOT": ROOT})
    (image,) = copy_with_new_uids([shared_dicom / "dev_01_dx_pa_explicit_window.dcm"], tmp_path / "send")
    uids = read_uids(image)
    store_ok([image], server.dicom_port)

    rows, events, instances = _wait_for_objects(server.data_dir, 2)
    assert sorted(r.kind for r in rows) == ["ai-gsps", "ai-sr"]
    assert instances == [uids.sop]  # the objects are not images of the study
    stored = [e for e in events if isinstance(e, ResultObjectStored)]
    assert sorted(e.sop_instance_uid for e in stored) == sorted(r.sop_instance_uid for r in rows)
    assert {(e.category, e.study_uid) for e in stored} == {("ai-results", uids.study)}
    for row in rows:
        path = server.data_dir / row.file_path
        assert dciodvfy(path) == []
        written = pydicom.dcmread(path)
        assert written.StudyInstanceUID == uids.study
        assert written.SOPInstanceUID.startswith(ROOT + ".")

    server.stop_cleanly()
    server.start()
    assert all((server.data_dir / row.file_path).is_file() for row in rows)  # kept by the start-up clean-up
    rows_again, _, _ = _wait_for_objects(server.data_dir, 2)
    assert [r.sop_instance_uid for r in rows_again] == [r.sop_instance_uid for r in rows]
