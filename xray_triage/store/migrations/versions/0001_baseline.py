"""Baseline: the schema of release 0.1.0 (main at 7f0ccd2), as ``create_all`` made it.

Revision ID: 0001_baseline
Revises:
Create Date: 2026-11-30

A 0.1.0 database has these tables but no ``alembic_version``. Upgrading it runs this
migration too: it creates only what is missing (tables, and indexes on existing tables,
as 0.1.0's start-up did for databases of earlier builds) and stops with a clear error if
an existing table lacks one of the columns below. The table definitions are a copy, not
an import of ``schema.py``, so that later changes to the models never change this step.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_baseline"
down_revision = None
branch_labels = None
depends_on = None

BASELINE = sa.MetaData()

sa.Table(
    "audit_events",
    BASELINE,
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("user_id", sa.Integer(), nullable=True),
    sa.Column("username", sa.String(length=64), nullable=False),
    sa.Column("action", sa.String(length=64), nullable=False),
    sa.Column("study_uid", sa.String(length=64), nullable=True),
    sa.Column("detail", sa.JSON(), nullable=False),
    sa.Column("ip", sa.String(length=64), nullable=False),
    sa.PrimaryKeyConstraint("id"),
)
sa.Index("ix_audit_events_at", BASELINE.tables["audit_events"].c["at"], unique=False)
sa.Index("ix_audit_events_study_uid", BASELINE.tables["audit_events"].c["study_uid"], unique=False)
sa.Index("ix_audit_events_user_id", BASELINE.tables["audit_events"].c["user_id"], unique=False)
sa.Table(
    "outbox_cursors",
    BASELINE,
    sa.Column("consumer", sa.String(length=64), nullable=False),
    sa.Column("last_id", sa.Integer(), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint("consumer"),
)
sa.Table(
    "outbox_events",
    BASELINE,
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("type", sa.String(length=64), nullable=False),
    sa.Column("study_uid", sa.String(length=64), nullable=False),
    sa.Column("station_ae", sa.String(length=16), nullable=False),
    sa.Column("payload", sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint("id"),
    sqlite_autoincrement=True,
)
sa.Table(
    "quarantined_instances",
    BASELINE,
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("reason", sa.String(length=32), nullable=False),
    sa.Column("detail", sa.Text(), nullable=False),
    sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
    sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
    sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
    sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
    sa.Column("conflicting_station_ae", sa.String(length=16), nullable=False),
    sa.Column("transfer_syntax_uid", sa.String(length=64), nullable=False),
    sa.Column("file_path", sa.Text(), nullable=False),
    sa.Column("file_size", sa.Integer(), nullable=False),
    sa.Column("sha256", sa.String(length=64), nullable=False),
    sa.Column("calling_ae", sa.String(length=16), nullable=False),
    sa.Column("peer_address", sa.String(length=64), nullable=False),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint("id"),
)
sa.Index(
    "ix_quarantined_instances_calling_ae",
    BASELINE.tables["quarantined_instances"].c["calling_ae"],
    unique=False,
)
sa.Index(
    "ix_quarantined_instances_received_at",
    BASELINE.tables["quarantined_instances"].c["received_at"],
    unique=False,
)
sa.Index(
    "ix_quarantined_instances_sop_instance_uid",
    BASELINE.tables["quarantined_instances"].c["sop_instance_uid"],
    unique=False,
)
sa.Table(
    "stations",
    BASELINE,
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("ae_title", sa.String(length=16), nullable=False),
    sa.Column("name", sa.String(length=200), nullable=False),
    sa.Column("allowed_ips", sa.Text(), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint("id"),
    sa.UniqueConstraint("ae_title"),
)
sa.Table(
    "studies",
    BASELINE,
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
    sa.Column("patient_id", sa.String(length=64), nullable=False),
    sa.Column("patient_name", sa.String(length=324), nullable=False),
    sa.Column("patient_sex", sa.String(length=16), nullable=False),
    sa.Column("patient_birth_date", sa.String(length=8), nullable=False),
    sa.Column("patient_age", sa.String(length=4), nullable=False),
    sa.Column("study_date", sa.String(length=8), nullable=False),
    sa.Column("study_time", sa.String(length=16), nullable=False),
    sa.Column("accession_number", sa.String(length=16), nullable=False),
    sa.Column("description", sa.String(length=64), nullable=False),
    sa.Column("institution_name", sa.String(length=64), nullable=False),
    sa.Column("station_ae", sa.String(length=16), nullable=False),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("ai_status", sa.String(length=16), nullable=False),
    sa.Column("priority", sa.String(length=16), nullable=True),
    sa.Column("priority_rank", sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint("id"),
    sa.UniqueConstraint("study_instance_uid"),
)
sa.Index("ix_studies_ai_status", BASELINE.tables["studies"].c["ai_status"], unique=False)
sa.Index("ix_studies_priority", BASELINE.tables["studies"].c["priority"], unique=False)
sa.Index("ix_studies_priority_rank", BASELINE.tables["studies"].c["priority_rank"], unique=False)
sa.Index("ix_studies_received_at", BASELINE.tables["studies"].c["received_at"], unique=False)
sa.Index("ix_studies_station_ae", BASELINE.tables["studies"].c["station_ae"], unique=False)
sa.Index("ix_studies_updated_at", BASELINE.tables["studies"].c["updated_at"], unique=False)
sa.Table(
    "users",
    BASELINE,
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("username", sa.String(length=64), nullable=False),
    sa.Column("display_name", sa.String(length=200), nullable=False),
    sa.Column("password_hash", sa.String(length=255), nullable=False),
    sa.Column("role", sa.String(length=16), nullable=False),
    sa.Column("station_ae", sa.String(length=16), nullable=True),
    sa.Column("language", sa.String(length=8), nullable=False),
    sa.Column("timezone", sa.String(length=64), nullable=False),
    sa.Column("disabled", sa.Boolean(), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_login_at", sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint("id"),
    sa.UniqueConstraint("username"),
)
sa.Table(
    "api_tokens",
    BASELINE,
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("token_hash", sa.String(length=64), nullable=False),
    sa.Column("user_id", sa.Integer(), nullable=False),
    sa.Column("name", sa.String(length=100), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("revoked", sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(
        ["user_id"],
        ["users.id"],
    ),
    sa.PrimaryKeyConstraint("id"),
    sa.UniqueConstraint("token_hash"),
)
sa.Index("ix_api_tokens_user_id", BASELINE.tables["api_tokens"].c["user_id"], unique=False)
sa.Table(
    "consults",
    BASELINE,
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("study_id", sa.Integer(), nullable=False),
    sa.Column("requested_by_id", sa.Integer(), nullable=False),
    sa.Column("question", sa.Text(), nullable=False),
    sa.Column("urgency", sa.String(length=16), nullable=False),
    sa.Column("status", sa.String(length=16), nullable=False),
    sa.Column("claimed_by_id", sa.Integer(), nullable=True),
    sa.Column("conclusion", sa.String(length=32), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(
        ["claimed_by_id"],
        ["users.id"],
    ),
    sa.ForeignKeyConstraint(
        ["requested_by_id"],
        ["users.id"],
    ),
    sa.ForeignKeyConstraint(
        ["study_id"],
        ["studies.id"],
    ),
    sa.PrimaryKeyConstraint("id"),
)
sa.Index("ix_consults_status", BASELINE.tables["consults"].c["status"], unique=False)
sa.Index("ix_consults_study_id", BASELINE.tables["consults"].c["study_id"], unique=False)
sa.Table(
    "series",
    BASELINE,
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
    sa.Column("study_id", sa.Integer(), nullable=False),
    sa.Column("modality", sa.String(length=16), nullable=False),
    sa.Column("body_part", sa.String(length=64), nullable=False),
    sa.Column("series_number", sa.String(length=12), nullable=False),
    sa.Column("description", sa.String(length=64), nullable=False),
    sa.ForeignKeyConstraint(
        ["study_id"],
        ["studies.id"],
    ),
    sa.PrimaryKeyConstraint("id"),
    sa.UniqueConstraint("series_instance_uid"),
)
sa.Index("ix_series_study_id", BASELINE.tables["series"].c["study_id"], unique=False)
sa.Table(
    "user_sessions",
    BASELINE,
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("token_hash", sa.String(length=64), nullable=False),
    sa.Column("user_id", sa.Integer(), nullable=False),
    sa.Column("csrf_token", sa.String(length=64), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("ip", sa.String(length=64), nullable=False),
    sa.ForeignKeyConstraint(
        ["user_id"],
        ["users.id"],
    ),
    sa.PrimaryKeyConstraint("id"),
    sa.UniqueConstraint("token_hash"),
)
sa.Index("ix_user_sessions_user_id", BASELINE.tables["user_sessions"].c["user_id"], unique=False)
sa.Table(
    "consult_messages",
    BASELINE,
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("consult_id", sa.Integer(), nullable=False),
    sa.Column("author_id", sa.Integer(), nullable=False),
    sa.Column("body", sa.Text(), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(
        ["author_id"],
        ["users.id"],
    ),
    sa.ForeignKeyConstraint(
        ["consult_id"],
        ["consults.id"],
    ),
    sa.PrimaryKeyConstraint("id"),
)
sa.Index("ix_consult_messages_consult_id", BASELINE.tables["consult_messages"].c["consult_id"], unique=False)
sa.Table(
    "instances",
    BASELINE,
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
    sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
    sa.Column("series_id", sa.Integer(), nullable=False),
    sa.Column("transfer_syntax_uid", sa.String(length=64), nullable=False),
    sa.Column("instance_number", sa.String(length=12), nullable=False),
    sa.Column("view_position", sa.String(length=16), nullable=False),
    sa.Column("rows", sa.Integer(), nullable=True),
    sa.Column("columns", sa.Integer(), nullable=True),
    sa.Column("file_path", sa.Text(), nullable=False),
    sa.Column("file_size", sa.Integer(), nullable=False),
    sa.Column("calling_ae", sa.String(length=16), nullable=False),
    sa.Column("peer_address", sa.String(length=64), nullable=False),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("receive_ms", sa.Float(), nullable=True),
    sa.Column("store_ms", sa.Float(), nullable=True),
    sa.Column("ai_status", sa.String(length=16), nullable=False),
    sa.Column("ai_error", sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(
        ["series_id"],
        ["series.id"],
    ),
    sa.PrimaryKeyConstraint("id"),
    sa.UniqueConstraint("sop_instance_uid"),
)
sa.Index("ix_instances_ai_status", BASELINE.tables["instances"].c["ai_status"], unique=False)
sa.Index("ix_instances_series_id", BASELINE.tables["instances"].c["series_id"], unique=False)
sa.Table(
    "annotations",
    BASELINE,
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("instance_id", sa.Integer(), nullable=False),
    sa.Column("study_id", sa.Integer(), nullable=False),
    sa.Column("author_id", sa.Integer(), nullable=False),
    sa.Column("kind", sa.String(length=16), nullable=False),
    sa.Column("geometry", sa.JSON(), nullable=False),
    sa.Column("label", sa.String(length=500), nullable=False),
    sa.Column("color", sa.String(length=16), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(
        ["author_id"],
        ["users.id"],
    ),
    sa.ForeignKeyConstraint(
        ["instance_id"],
        ["instances.id"],
    ),
    sa.ForeignKeyConstraint(
        ["study_id"],
        ["studies.id"],
    ),
    sa.PrimaryKeyConstraint("id"),
)
sa.Index("ix_annotations_instance_id", BASELINE.tables["annotations"].c["instance_id"], unique=False)
sa.Index("ix_annotations_study_id", BASELINE.tables["annotations"].c["study_id"], unique=False)
sa.Table(
    "triage_jobs",
    BASELINE,
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("instance_id", sa.Integer(), nullable=False),
    sa.Column("state", sa.String(length=16), nullable=False),
    sa.Column("attempts", sa.Integer(), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("worker", sa.String(length=64), nullable=True),
    sa.Column("error", sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(
        ["instance_id"],
        ["instances.id"],
    ),
    sa.PrimaryKeyConstraint("id"),
    sa.UniqueConstraint("instance_id", name="uq_triage_jobs_instance"),
)
sa.Index("ix_triage_jobs_state", BASELINE.tables["triage_jobs"].c["state"], unique=False)
sa.Table(
    "triage_results",
    BASELINE,
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("instance_id", sa.Integer(), nullable=False),
    sa.Column("model_version", sa.String(length=128), nullable=False),
    sa.Column("probabilities", sa.JSON(), nullable=False),
    sa.Column("thresholds", sa.JSON(), nullable=False),
    sa.Column("flagged", sa.JSON(), nullable=False),
    sa.Column("abnormal_score", sa.Float(), nullable=False),
    sa.Column("priority", sa.String(length=16), nullable=False),
    sa.Column("timings_ms", sa.JSON(), nullable=False),
    sa.Column("heatmaps", sa.JSON(), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(
        ["instance_id"],
        ["instances.id"],
    ),
    sa.PrimaryKeyConstraint("id"),
    sa.UniqueConstraint("instance_id", name="uq_triage_results_instance"),
)


def upgrade() -> None:
    bind = op.get_bind()
    inspector = sa.inspect(bind)
    existing = set(inspector.get_table_names())
    for table in BASELINE.sorted_tables:
        if table.name not in existing:
            continue
        have = {column["name"] for column in inspector.get_columns(table.name)}
        missing = [column.name for column in table.columns if column.name not in have]
        if missing:
            raise RuntimeError(
                f"table {table.name} does not match the 0.1.0 schema (missing columns: {', '.join(missing)}); "
                "this database was not made by xray-triage 0.1.0"
            )
    BASELINE.create_all(bind, checkfirst=True)
    for table in BASELINE.sorted_tables:
        for index in table.indexes:
            index.create(bind, checkfirst=True)


def downgrade() -> None:
    BASELINE.drop_all(op.get_bind())
