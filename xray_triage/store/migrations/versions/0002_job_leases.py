"""Triage job leases: ``triage_jobs.lease_expires_at`` (several worker processes share the queue).

Revision ID: 0002_job_leases
Revises: 0001_baseline
Create Date: 2026-11-30

A ``running`` job left by 0.1.0 has no lease (NULL): any worker may take it over, which is
what 0.1.0's start-up did by re-queueing every running job.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_job_leases"
down_revision = "0001_baseline"
branch_labels = None
depends_on = None


def upgrade() -> None:
    columns = {column["name"] for column in sa.inspect(op.get_bind()).get_columns("triage_jobs")}
    if "lease_expires_at" in columns:  # an unversioned database made by code that already had it
        return
    with op.batch_alter_table("triage_jobs") as batch:
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_index("ix_triage_jobs_lease_expires_at", ["lease_expires_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("triage_jobs") as batch:
        batch.drop_index("ix_triage_jobs_lease_expires_at")
        batch.drop_column("lease_expires_at")
