"""Ingest, the durable queue and the settings object, on a real SQLite database."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select

from onnx_factory import write_tiny_model_dir
from xray_triage.inference.card import load_card
from xray_triage.inference.runner import ModelRunner
from xray_triage.settings import SettingsError, load_settings
from xray_triage.store.db import Database
from xray_triage.store.ingest import STATUS_DATASET_MISMATCH, STATUS_OUT_OF_RESOURCES, Ingestor, TriagePolicy
from xray_triage.store.schema import Instance, Study, TriageJob, TriageResult
from xray_triage.store.stations import StationError, add_station, admit
from xray_triage.triage import jobs
from xray_triage.triage.worker import TriageWorkers

SHARED_DICOM = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom"
pytestmark = pytest.mark.skipif(not SHARED_DICOM.is_dir(), reason="shared DICOM data not found")


@pytest.fixture()
def db(tmp_path: Path) -> Database:
    database = Database(f"sqlite:///{tmp_path / 'test.db'}")
    database.create_schema()
    yield database
    database.dispose()


def _ingestor(tmp_path: Path, db: Database) -> Ingestor:
    return Ingestor(tmp_path / "data", db, TriagePolicy(["CR", "DX"], ["CHEST"]))


def _read(name: str) -> tuple[pydicom.Dataset, bytes]:
    raw = (SHARED_DICOM / name).read_bytes()
    return pydicom.dcmread(io.BytesIO(raw)), raw


def _ingest(ingestor: Ingestor, ds: pydicom.Dataset, raw: bytes):  # type: ignore[no-untyped-def]
    return ingestor.ingest(
        ds, raw, transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID), calling_ae="ST1", peer_address="127.0.0.1"
    )


def _count(db: Database, model: type) -> int:
    with db.session() as s:
        return s.scalar(select(func.count()).select_from(model))


def test_ingest_stores_bytes_as_received_and_queues_one_job(tmp_path: Path, db: Database) -> None:
    ingestor = _ingestor(tmp_path, db)
    ds, raw = _read("dev_06_dx_pa_j2k_lossless.dcm")
    outcome = _ingest(ingestor, ds, raw)
    assert outcome.ok and outcome.triage_queued
    with db.session() as s:
        instance = s.scalar(select(Instance))
        assert (tmp_path / "data" / instance.file_path).read_bytes() == raw
        assert instance.file_path == f"dicom/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
    again = _ingest(ingestor, ds, raw)
    assert again.ok and again.duplicate
    assert (_count(db, Instance), _count(db, TriageJob)) == (1, 1)
    assert not list((tmp_path / "data" / "incoming").glob("*"))


def test_vietnamese_name_is_decoded_with_its_character_set(tmp_path: Path, db: Database) -> None:
    ds, raw = _read("dev_07_dx_pa_utf8_name.dcm")
    assert _ingest(_ingestor(tmp_path, db), ds, raw).ok
    with db.session() as s:
        study = s.scalar(select(Study))
        assert study.patient_name == "Nguyễn^Thị Hồng"
        assert study.institution_name == "Trạm Y tế Thanh An"


def test_database_failure_answers_out_of_resources_and_leaves_no_file(tmp_path: Path, db: Database) -> None:
    ingestor = _ingestor(tmp_path, db)
    ds, raw = _read("dev_01_dx_pa_explicit_window.dcm")
    with db.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE triage_jobs")  # the commit after the file write fails
    outcome = _ingest(ingestor, ds, raw)
    assert outcome.status == STATUS_OUT_OF_RESOURCES
    assert not list((tmp_path / "data" / "dicom").rglob("*.dcm"))
    assert _count(db, Instance) == 0


def test_truncated_native_pixel_data_is_refused(tmp_path: Path, db: Database) -> None:
    ds, raw = _read("dev_01_dx_pa_explicit_window.dcm")
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    outcome = _ingest(_ingestor(tmp_path, db), ds, raw)
    assert outcome.status == STATUS_DATASET_MISMATCH and "truncated" in outcome.message
    assert _count(db, Instance) == 0


def test_path_traversal_uid_is_refused(tmp_path: Path, db: Database) -> None:
    ds, raw = _read("dev_01_dx_pa_explicit_window.dcm")
    ds.SeriesInstanceUID = "1.2/../../../etc"
    outcome = _ingest(_ingestor(tmp_path, db), ds, raw)
    assert outcome.status == STATUS_DATASET_MISMATCH and "not a valid UID" in outcome.message
    assert not (tmp_path / "etc").exists() and _count(db, Instance) == 0


def test_queue_recovers_interrupted_job_and_records_one_result(tmp_path: Path, db: Database) -> None:
    ingestor = _ingestor(tmp_path, db)
    for name in ("dev_01_dx_pa_explicit_window.dcm", "dev_05_dx_ap_rle.dcm"):
        ds, raw = _read(name)
        assert _ingest(ingestor, ds, raw).ok
    claimed = jobs.claim_next(db, "crashed-worker")
    assert claimed is not None
    assert jobs.recover_interrupted(db) == 1  # what start-up does after a crash
    runner = ModelRunner(load_card(write_tiny_model_dir(tmp_path / "m")))
    workers = TriageWorkers(db, runner, tmp_path / "data")
    while workers.run_one():
        pass
    assert _count(db, TriageResult) == 2
    with db.session() as s:
        assert {i.ai_status for i in s.scalars(select(Instance))} == {"done"}
        assert {j.state for j in s.scalars(select(TriageJob))} == {"done"}
        assert all(st.priority in ("urgent", "abnormal", "normal") for st in s.scalars(select(Study)))
    # Completing the same instance again keeps exactly one result.
    jobs.complete(db, claimed, jobs_analysis_stub(runner))
    assert _count(db, TriageResult) == 2


def jobs_analysis_stub(runner: ModelRunner):  # type: ignore[no-untyped-def]
    import numpy as np

    from xray_triage.pipeline.pixels import DisplayImage
    from xray_triage.triage.analyze import analyze_display

    image = DisplayImage(np.zeros((64, 64), np.float32), (64, 64), "minmax")
    return analyze_display(image, runner, 0.0)


def test_stations_admission_rules(db: Database) -> None:
    with db.session() as s:
        add_station(s, "ST1", "Trạm Y tế Thạnh An")
        add_station(s, "ST2", "Island", allowed_ips="10.0.0.0/8")
        with pytest.raises(StationError, match="already registered"):
            add_station(s, "ST1", "again")
        with pytest.raises(StationError, match="invalid AE title"):
            add_station(s, "A" * 17, "too long")
        with pytest.raises(StationError, match="invalid IP"):
            add_station(s, "ST3", "bad", allowed_ips="10.0.0.300")
    with db.session() as s:
        assert admit(s, "ST1", "127.0.0.1", accept_unknown=False).accepted
        assert not admit(s, "ST2", "127.0.0.1", accept_unknown=False).accepted
        assert admit(s, "ST2", "10.1.2.3", accept_unknown=False).accepted
        unknown = admit(s, "NOBODY", "127.0.0.1", accept_unknown=False)
        assert not unknown.accepted and unknown.calling_ae_unknown
        assert admit(s, "NOBODY", "127.0.0.1", accept_unknown=True).accepted


def test_settings_from_toml_env_and_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "xray-triage.toml"
    config.write_text('dicom_port = 4242\nae_title = "FROM_TOML"\naccept_unknown_stations = true\n')
    monkeypatch.setenv("XRAY_TRIAGE_AE_TITLE", "FROM_ENV")
    monkeypatch.delenv("XRAY_TRIAGE_CONFIG", raising=False)
    settings = load_settings(config, http_port=9999)
    assert (settings.dicom_port, settings.ae_title, settings.http_port) == (4242, "FROM_ENV", 9999)
    assert settings.accept_unknown_stations is True
    assert settings.resolved_database_url.startswith("sqlite:///")
    config.write_text("dicom_port = 99999\n")
    with pytest.raises(SettingsError, match="dicom_port"):
        load_settings(config)
    with pytest.raises(SettingsError, match="not found"):
        load_settings(tmp_path / "missing.toml")


def test_create_schema_adds_missing_indexes_and_tables_to_an_older_database(tmp_path: Path) -> None:
    """A database made by an earlier version gains the new tables and indexes at start-up."""
    import sqlite3

    from xray_triage.store.db import Database

    path = tmp_path / "old.db"
    db = Database(f"sqlite:///{path}")
    db.create_schema()
    db.dispose()
    with sqlite3.connect(path) as conn:
        conn.execute("DROP INDEX ix_studies_updated_at")
        conn.execute("DROP TABLE annotations")
    db = Database(f"sqlite:///{path}")
    db.create_schema()
    db.dispose()
    with sqlite3.connect(path) as conn:
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert {"ix_studies_updated_at", "annotations", "users", "consults"} <= names
