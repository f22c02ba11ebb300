"""Shared login limiting: the ``login_failures`` table (several web processes).

Revision ID: 0004_login_failures
Revises: 0003_results_out
Create Date: 2026-11-30

One row per failed login within the limiter's window (``consult_web.auth.LoginLimiter``), so
every web process counts every other's failures. Starts empty: an upgrade forgets nothing
that 0.1.0 kept (its limiter lived in memory).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_login_failures"
down_revision = "0003_results_out"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # An unversioned database made by a development build (taken for 0.1.0 by ``store/migrate.py``)
    # may have the table already: only what is missing.
    if "login_failures" in sa.inspect(op.get_bind()).get_table_names():
        return
    op.create_table(
        "login_failures",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("network", sa.String(length=64), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("login_failures", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_login_failures_at"), ["at"], unique=False)
        batch_op.create_index("ix_login_failures_network_at", ["network", "at"], unique=False)
        batch_op.create_index("ix_login_failures_username_at", ["username", "at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("login_failures", schema=None) as batch_op:
        batch_op.drop_index("ix_login_failures_username_at")
        batch_op.drop_index("ix_login_failures_network_at")
        batch_op.drop_index(batch_op.f("ix_login_failures_at"))
    op.drop_table("login_failures")
