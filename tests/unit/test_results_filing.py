"""Filing an object we made: file + row + event in one transaction, and the start-up clean-up keeps it."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from pathlib import Path

import pydicom
from sqlalchemy import select

from e2e_helpers import SHARED_DICOM
from xray_triage.events import ResultObjectStored
from xray_triage.results.annotation_gsps import KIND, build_annotation_gsps
from xray_triage.results.filing import Source, file_result
from xray_triage.settings import Settings
from xray_triage.store import outbox
from xray_triage.store.db import open_database
from xray_triage.store.result_objects import CATEGORY_CONSULT, ResultObject, find_result_object
from xray_triage.store.schema import Study
from xray_triage_server.serve import reconcile_files

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_filed_object_is_recorded_and_survives_the_startup_cleanup(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    db = open_database(settings)
    source = pydicom.dcmread(SHARED_DICOM / "dev_01_dx_pa_explicit_window.dcm", stop_before_pixels=True)
    gsps = build_annotation_gsps(source, [], uid_root="", version=1, content_sha256="a" * 64, now=NOW)
    try:
        with db.session() as session:
            study = Study(study_instance_uid=str(source.StudyInstanceUID), station_ae="STATION1")
            session.add(study)
            session.flush()
            source_key = f"{KIND}:{source.SOPInstanceUID}"
            row = file_result(
                session, settings.data_dir, gsps, Source(study, None, KIND, CATEGORY_CONSULT, source_key, "a" * 64), 1
            )
            relpath = row.file_path
        orphan = settings.data_dir / "dicom" / "1.2" / "3.4" / "5.6.dcm"  # a file whose row never committed
        orphan.parent.mkdir(parents=True)
        orphan.write_bytes(b"x")
        old = time.time() - settings.leftover_grace_s - 60  # past the grace another process's file gets
        os.utime(orphan, (old, old))
        os.utime(settings.data_dir / relpath, (old, old))  # a filed object is kept however old
        reconcile_files(settings, db)
        assert (settings.data_dir / relpath).is_file() and not orphan.exists()
        assert pydicom.dcmread(settings.data_dir / relpath).SOPInstanceUID == gsps.SOPInstanceUID
        with db.read_session() as session:
            found = find_result_object(session, gsps.SOPInstanceUID)
            assert found is not None and (found.kind, found.category, found.version) == (KIND, CATEGORY_CONSULT, 1)
            assert session.scalars(select(ResultObject)).all() == [found]
            (event,) = [e.event for e in outbox.read_after(session, 0)[0]]
        assert event == ResultObjectStored(
            str(source.StudyInstanceUID), "STATION1", gsps.SOPInstanceUID, gsps.SOPClassUID, CATEGORY_CONSULT
        )
    finally:
        db.dispose()
