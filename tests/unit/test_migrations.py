"""Alembic migrations: a 0.1.0 database (made by ``create_all``, no ``alembic_version``) with data is
upgraded by ``xray-triage db upgrade`` without losing a row; the server refuses an old schema."""

from __future__ import annotations

import importlib.util
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, inspect, select, text

from xray_triage.settings import Settings
from xray_triage.store import migrate
from xray_triage.store.db import Database
from xray_triage.store.queries import list_studies
from xray_triage.store.schema import TriageJob
from xray_triage.store.schema_error import SchemaError
from xray_triage.triage import jobs
from xray_triage_server.cli import main
from xray_triage_server.cli_error import CliError
from xray_triage_server.serve import check_schema

BASELINE_FILE = Path(migrate.__file__).parent / "migrations" / "versions" / "0001_baseline.py"
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _baseline_tables():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("baseline_0001", BASELINE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.BASELINE.tables


ROWS = {
    "stations": [{"id": 1, "ae_title": "ST1", "name": "Trạm Y tế Thạnh An", "allowed_ips": None, "created_at": T0}],
    "studies": [
        {
            "id": 1, "study_instance_uid": "1.2.3", "patient_id": "P1", "patient_name": "Nguyễn^Văn An",
            "patient_sex": "M", "patient_birth_date": "19590101", "patient_age": "067Y", "study_date": "20260102",
            "study_time": "030405", "accession_number": "A1", "description": "CHEST", "institution_name": "TYT",
            "station_ae": "ST1", "received_at": T0, "updated_at": T0, "ai_status": "done", "priority": "urgent",
            "priority_rank": 3,
        }
    ],
    "series": [
        {"id": 1, "series_instance_uid": "1.2.3.1", "study_id": 1, "modality": "DX", "body_part": "CHEST",
         "series_number": "1", "description": ""}
    ],
    "instances": [
        {
            "id": i, "sop_instance_uid": f"1.2.3.1.{i}", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1.1",
            "series_id": 1, "transfer_syntax_uid": "1.2.840.10008.1.2.1", "instance_number": str(i),
            "view_position": "PA", "rows": 10, "columns": 10, "file_path": f"dicom/1.2.3/1.2.3.1/1.2.3.1.{i}.dcm",
            "file_size": 100, "calling_ae": "ST1", "peer_address": "127.0.0.1", "received_at": T0,
            "receive_ms": 1.5, "store_ms": 2.5, "ai_status": "done" if i == 1 else "pending", "ai_error": None,
        }
        for i in (1, 2)
    ],
    "triage_jobs": [
        {"id": 1, "instance_id": 1, "state": "done", "attempts": 1, "created_at": T0, "started_at": T0,
         "finished_at": T0, "worker": "worker-0", "error": None},
        # left running by a 0.1.0 process that crashed: no lease, so any worker takes it over
        {"id": 2, "instance_id": 2, "state": "running", "attempts": 1, "created_at": T0, "started_at": T0,
         "finished_at": None, "worker": "worker-0", "error": None},
    ],
    "triage_results": [
        {"id": 1, "instance_id": 1, "model_version": "demo@0.1.0", "probabilities": {"Effusion": 0.9},
         "thresholds": {"Effusion": 0.5}, "flagged": ["Effusion"], "abnormal_score": 0.9, "priority": "urgent",
         "timings_ms": {"infer": 12.0}, "heatmaps": {}, "created_at": T0}
    ],
    "users": [
        {"id": 1, "username": "bs.an", "display_name": "BS. An", "password_hash": "$argon2id$x", "role": "station",
         "station_ae": "ST1", "language": "vi", "timezone": "Asia/Ho_Chi_Minh", "disabled": False,
         "created_at": T0, "last_login_at": None}
    ],
    "consults": [
        {"id": 1, "study_id": 1, "requested_by_id": 1, "question": "Tràn dịch?", "urgency": "emergency",
         "status": "requested", "claimed_by_id": None, "conclusion": None, "created_at": T0, "updated_at": T0}
    ],
    "audit_events": [
        {"id": 1, "at": T0, "user_id": 1, "username": "bs.an", "action": "consult_requested", "study_uid": "1.2.3",
         "detail": {"urgency": "emergency"}, "ip": "127.0.0.1"}
    ],
    "outbox_events": [
        {"id": 1, "created_at": T0, "type": "InstanceStored", "study_uid": "1.2.3", "station_ae": "ST1",
         "payload": {"sop_instance_uid": "1.2.3.1.1"}}
    ],
    "outbox_cursors": [{"consumer": "exporter", "last_id": 1, "updated_at": T0}],
}  # fmt: skip


def make_0_1_0_database(url: str) -> Database:
    """A database as 0.1.0 left it: the baseline schema, data, and no ``alembic_version``."""
    db = Database(url)
    migrate.upgrade(db.engine, "0001_baseline")
    tables = _baseline_tables()
    with db.engine.begin() as conn:
        conn.execute(text("DROP TABLE alembic_version"))
        for name, rows in ROWS.items():
            conn.execute(tables[name].insert(), rows)
    return db


def _dump(db: Database) -> dict[str, list[tuple]]:
    tables = _baseline_tables()
    with db.engine.connect() as conn:
        return {
            name: [tuple(r) for r in conn.execute(select(*tables[name].columns).order_by(*tables[name].primary_key))]
            for name in ROWS
        }


def test_a_0_1_0_database_is_refused_then_upgraded_without_losing_data(database_url: str) -> None:
    db = make_0_1_0_database(database_url)
    try:
        before = _dump(db)
        assert migrate.schema_state(db.engine).state == migrate.OUTDATED
        with pytest.raises(SchemaError, match="xray-triage db upgrade"):
            db.create_schema()  # what `stations add` and the other commands do
        with pytest.raises(CliError, match="xray-triage db upgrade"):
            check_schema(db)  # what `serve` does before it starts anything

        state = db.upgrade_schema()

        assert (state.state, state.current) == (migrate.CURRENT, migrate.head_revision())
        assert _dump(db) == before  # every row of every 0.1.0 table, every value
        assert "lease_expires_at" in {c["name"] for c in inspect(db.engine).get_columns("triage_jobs")}
        db.create_schema()  # now accepted
        with db.read_session() as session:
            (study,) = list_studies(session, limit=10, urgent_labels=("Effusion",))
        assert (study["study_uid"], study["patient_name_dicom"], study["priority"], study["why"]) == (
            "1.2.3", "Nguyễn^Văn An", "urgent", "emergency_consult",
        )  # fmt: skip
        # The job 0.1.0 left running has no lease: a worker takes it over (0.1.0 re-queued it at start-up).
        claimed = jobs.claim_next(db, "host:1/0", clock=lambda: T0)
        assert claimed is not None and (claimed.job_id, claimed.attempts) == (2, 2)
        with db.read_session() as session:
            assert session.scalar(select(func.count()).select_from(TriageJob)) == 2
    finally:
        db.dispose()


def test_db_upgrade_command_upgrades_and_reports(tmp_path: Path, database_url: str, capsys) -> None:  # type: ignore[no-untyped-def]
    make_0_1_0_database(database_url).dispose()
    settings_env = {"database_url": database_url}
    data_dir = tmp_path / "data"
    assert Settings(data_dir=data_dir, **settings_env).resolved_database_url == database_url
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XRAY_TRIAGE_DATABASE_URL", database_url)
        assert main(["db", "status", "--data-dir", str(data_dir)]) == 1
        assert main(["db", "upgrade", "--data-dir", str(data_dir)]) == 0
        assert main(["db", "upgrade", "--data-dir", str(data_dir)]) == 0
        assert main(["db", "status", "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    head = migrate.head_revision()
    assert out == [
        f"outdated: database at none, this version needs {head}",
        f"database schema upgraded from none (0.1.0 or empty) to {head}",
        f"database schema already at {head} (head)",
        f"current: database at {head}, this version needs {head}",
    ]


def test_an_empty_database_gets_the_schema_from_the_migrations(database_url: str) -> None:
    db = Database(database_url)
    try:
        assert migrate.schema_state(db.engine).state == migrate.EMPTY
        db.create_schema()  # first run: no extra command
        assert migrate.schema_state(db.engine).state == migrate.CURRENT
    finally:
        db.dispose()


def test_a_table_that_does_not_match_the_baseline_is_not_stamped(database_url: str) -> None:
    db = Database(database_url)
    try:
        with db.engine.begin() as conn:
            conn.execute(text("CREATE TABLE stations (id INTEGER PRIMARY KEY, ae_title VARCHAR(16))"))
        with pytest.raises(RuntimeError, match="does not match the 0.1.0 schema"):
            db.upgrade_schema()
        assert migrate.schema_state(db.engine).current is None
    finally:
        db.dispose()


def test_the_migrations_build_exactly_the_models_schema(database_url: str) -> None:
    """A table or column added to the models without a migration shows up here (autogenerate diff)."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from xray_triage.store.db import metadata

    db = Database(database_url)
    try:
        db.create_schema()
        with db.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata())
        assert diff == []
    finally:
        db.dispose()
